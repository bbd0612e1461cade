#!/usr/bin/env bash
# Build, push and deploy the consensus-engine push receiver to Cloud Run.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/deploy.sh [options]

  1. builds the image with Cloud Build and pushes it to Artifact Registry
     (gcloud builds submit --tag REGION-docker.pkg.dev/PROJECT/REPOSITORY/SERVICE:TAG)
  2. migrates the database: Cloud Run job <service>-migrate runs `alembic upgrade head`
     with the image and the service's database settings (the service refuses work while
     its schema is behind)
  3. renders infra/cloudrun/service.yaml (every ${NAME} placeholder) and applies it with
     gcloud run services replace
  4. prints the service URL and the endpoints that Pub/Sub and Cloud Scheduler call
     (/pubsub/push, /pubsub/dead-letter, /tasks/sweep)

Run scripts/setup_gcp.sh first (APIs, service accounts, secret, repository, topics) and
again after the first deploy (the push subscriptions and the sweep job need the URL printed
here).

Options (environment variable in brackets; flags win over the environment):
  --project ID           Google Cloud project [PROJECT_ID; default: gcloud config]
  --region REGION        Cloud Run region [REGION; us-central1]
  --service NAME         Cloud Run service [SERVICE_NAME; consensus-engine]
  --repository NAME      Artifact Registry repository [AR_REPOSITORY; consensus-engine]
  --image REF            deploy this image; implies --skip-build [IMAGE]
  --tag TAG              image tag [IMAGE_TAG; git commit, with a timestamp when dirty]
  --sql-instance NAME    Cloud SQL instance name [SQL_INSTANCE; consensus-engine-db]
  --instance-connection-name PROJECT:REGION:INSTANCE
                         [DB_INSTANCE_CONNECTION_NAME; PROJECT:REGION:<sql-instance>]
  --db-name NAME         database [DB_NAME; consensus_engine]
  --db-user USER         IAM database user [receiver service account email minus
                         .gserviceaccount.com]
  --receiver-sa NAME     runtime service account id [RECEIVER_SA_NAME; consensus-receiver]
  --push-sa NAME         push service account id [PUSH_SA_NAME; consensus-push-invoker]
  --push-auth MODE       oidc | cloud-run-iam [PUSH_AUTH; oidc]
  --audience VALUE       push token audience [PUSH_AUDIENCE; <service>-pubsub-push]
  --api-principals LIST  emails allowed to call /v1 when --push-auth=oidc, comma-separated
                         [API_ALLOWED_PRINCIPALS; the active gcloud account]
  --api-audiences LIST   accepted audiences of /v1 callers' ID tokens
                         [API_AUDIENCES; gcloud's, i.e. `gcloud auth print-identity-token`]
  --topic NAME           jobs topic [PUBSUB_TOPIC; consensus-engine-jobs]
  --subscription NAME    push subscription [PUBSUB_SUBSCRIPTION; consensus-engine-jobs-sub]
  --secret NAME          OpenAI key secret [OPENAI_SECRET; openai-api-key]
  --openai-model NAME    [OPENAI_MODEL; gpt-5.1]
  --skip-build           deploy an image that is already pushed
  --skip-migrations      do not run the migration job
  --render-only          print the rendered manifest and exit (calls no gcloud)
  -h, --help             show this help
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MANIFEST="$ROOT/infra/cloudrun/service.yaml"

PROJECT_ID="${PROJECT_ID:-}"
REGION="${REGION:-us-central1}"
SERVICE_NAME="${SERVICE_NAME:-consensus-engine}"
AR_REPOSITORY="${AR_REPOSITORY:-consensus-engine}"
IMAGE="${IMAGE:-}"
IMAGE_TAG="${IMAGE_TAG:-}"
SQL_INSTANCE="${SQL_INSTANCE:-consensus-engine-db}"
DB_INSTANCE_CONNECTION_NAME="${DB_INSTANCE_CONNECTION_NAME:-}"
DB_NAME="${DB_NAME:-consensus_engine}"
# Not read from the environment: a developer's DB_USER (e.g. postgres) is not the IAM user.
DB_USER_OVERRIDE=""
RECEIVER_SA_NAME="${RECEIVER_SA_NAME:-consensus-receiver}"
PUSH_SA_NAME="${PUSH_SA_NAME:-consensus-push-invoker}"
PUSH_AUTH="${PUSH_AUTH:-oidc}"
PUSH_AUDIENCE="${PUSH_AUDIENCE:-}"
API_ALLOWED_PRINCIPALS="${API_ALLOWED_PRINCIPALS:-}"
# The `aud` of `gcloud auth print-identity-token` for a user account (gcloud's OAuth client).
API_AUDIENCES="${API_AUDIENCES:-32555940559.apps.googleusercontent.com}"
PUBSUB_TOPIC="${PUBSUB_TOPIC:-consensus-engine-jobs}"
PUBSUB_SUBSCRIPTION="${PUBSUB_SUBSCRIPTION:-consensus-engine-jobs-sub}"
OPENAI_SECRET="${OPENAI_SECRET:-openai-api-key}"
OPENAI_MODEL="${OPENAI_MODEL:-gpt-5.1}"
SKIP_BUILD=0
SKIP_MIGRATIONS=0
RENDER_ONLY=0

die() {
    echo "deploy.sh: $*" >&2
    exit 1
}

need_value() {
    [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help)
            usage
            exit 0
            ;;
        --project) need_value "$@"; PROJECT_ID="$2"; shift 2 ;;
        --region) need_value "$@"; REGION="$2"; shift 2 ;;
        --service) need_value "$@"; SERVICE_NAME="$2"; shift 2 ;;
        --repository) need_value "$@"; AR_REPOSITORY="$2"; shift 2 ;;
        --image) need_value "$@"; IMAGE="$2"; shift 2 ;;
        --tag) need_value "$@"; IMAGE_TAG="$2"; shift 2 ;;
        --sql-instance) need_value "$@"; SQL_INSTANCE="$2"; shift 2 ;;
        --instance-connection-name) need_value "$@"; DB_INSTANCE_CONNECTION_NAME="$2"; shift 2 ;;
        --db-name) need_value "$@"; DB_NAME="$2"; shift 2 ;;
        --db-user) need_value "$@"; DB_USER_OVERRIDE="$2"; shift 2 ;;
        --receiver-sa) need_value "$@"; RECEIVER_SA_NAME="$2"; shift 2 ;;
        --push-sa) need_value "$@"; PUSH_SA_NAME="$2"; shift 2 ;;
        --push-auth) need_value "$@"; PUSH_AUTH="$2"; shift 2 ;;
        --audience) need_value "$@"; PUSH_AUDIENCE="$2"; shift 2 ;;
        --api-principals) need_value "$@"; API_ALLOWED_PRINCIPALS="$2"; shift 2 ;;
        --api-audiences) need_value "$@"; API_AUDIENCES="$2"; shift 2 ;;
        --topic) need_value "$@"; PUBSUB_TOPIC="$2"; shift 2 ;;
        --subscription) need_value "$@"; PUBSUB_SUBSCRIPTION="$2"; shift 2 ;;
        --secret) need_value "$@"; OPENAI_SECRET="$2"; shift 2 ;;
        --openai-model) need_value "$@"; OPENAI_MODEL="$2"; shift 2 ;;
        --skip-build) SKIP_BUILD=1; shift ;;
        --skip-migrations) SKIP_MIGRATIONS=1; shift ;;
        --render-only) RENDER_ONLY=1; shift ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

# shellcheck disable=SC2034  # read through ${!name} when rendering
case "$PUSH_AUTH" in
    # The invoker check is off, so the app guards /v1 itself.
    oidc) INVOKER_IAM_DISABLED=true API_AUTH=oidc ;;
    # Cloud Run IAM guards every route already.
    cloud-run-iam) INVOKER_IAM_DISABLED=false API_AUTH=none ;;
    *) die "--push-auth must be oidc or cloud-run-iam, not '$PUSH_AUTH'" ;;
esac

# Never wait for a prompt: this runs unattended as well as by hand.
export CLOUDSDK_CORE_DISABLE_PROMPTS=1

if [[ -z "$PROJECT_ID" && "$RENDER_ONLY" -eq 0 ]]; then
    PROJECT_ID="$(gcloud config get-value project 2>/dev/null || true)"
fi
[[ -n "$PROJECT_ID" ]] || die "no project: pass --project or set PROJECT_ID"
if [[ "$API_AUTH" == oidc && -z "$API_ALLOWED_PRINCIPALS" && "$RENDER_ONLY" -eq 0 ]]; then
    API_ALLOWED_PRINCIPALS="$(gcloud config get-value account 2>/dev/null || true)"
fi
if [[ "$API_AUTH" == oidc && -z "$API_ALLOWED_PRINCIPALS" ]]; then
    die "--push-auth=oidc leaves /v1 to the app: pass --api-principals (who may call it)"
fi

if [[ -n "$IMAGE" ]]; then
    SKIP_BUILD=1
else
    if [[ -z "$IMAGE_TAG" ]]; then
        if IMAGE_TAG="$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null)"; then
            # Uncommitted changes get their own tag so they never overwrite a commit's image.
            if [[ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ]]; then
                IMAGE_TAG="${IMAGE_TAG}-dirty-$(date -u +%Y%m%d%H%M%S)"
            fi
        else
            IMAGE_TAG="build-$(date -u +%Y%m%d%H%M%S)"
        fi
    fi
    IMAGE="${REGION}-docker.pkg.dev/${PROJECT_ID}/${AR_REPOSITORY}/${SERVICE_NAME}:${IMAGE_TAG}"
fi

RECEIVER_SA="${RECEIVER_SA_NAME}@${PROJECT_ID}.iam.gserviceaccount.com"
PUSH_SA="${PUSH_SA_NAME}@${PROJECT_ID}.iam.gserviceaccount.com"
# Cloud SQL names an IAM database user after the service account, minus this suffix.
DB_USER="${DB_USER_OVERRIDE:-${RECEIVER_SA%.gserviceaccount.com}}"
DB_INSTANCE_CONNECTION_NAME="${DB_INSTANCE_CONNECTION_NAME:-${PROJECT_ID}:${REGION}:${SQL_INSTANCE}}"
PUSH_AUDIENCE="${PUSH_AUDIENCE:-${SERVICE_NAME}-pubsub-push}"

# The manifest's placeholders, in the order its header documents them.
PLACEHOLDERS=(
    SERVICE_NAME REGION IMAGE PROJECT_ID RECEIVER_SA PUSH_SA PUSH_AUTH INVOKER_IAM_DISABLED
    PUSH_AUDIENCE API_AUTH API_AUDIENCES API_ALLOWED_PRINCIPALS DB_INSTANCE_CONNECTION_NAME
    DB_NAME DB_USER PUBSUB_TOPIC PUBSUB_SUBSCRIPTION OPENAI_SECRET OPENAI_MODEL
)

render_manifest() {
    local text name value
    text="$(<"$MANIFEST")"
    # A quoted replacement is literal: no `&` expansion (bash 5.2's patsub_replacement).
    for name in "${PLACEHOLDERS[@]}"; do
        value="${!name}"
        # Values land inside quoted YAML scalars (custom-audiences inside single quotes).
        [[ "$value" != *[\"\'\\$'\n']* ]] || die "$name contains a quote, backslash or newline"
        text="${text//"\${${name}}"/"$value"}"
    done
    if grep -Eq '^[^#]*\$\{[A-Z_]+\}' <<<"$text"; then
        die "unrendered placeholder in $MANIFEST: $(grep -Eo '^[^#]*\$\{[A-Z_]+\}' <<<"$text" | head -1)"
    fi
    printf '%s\n' "$text"
}

if ((RENDER_ONLY)); then
    render_manifest
    exit 0
fi

P=(--project="$PROJECT_ID")
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

step() {
    printf '\n==> %s\n' "$*"
}

# Rendered first, so a bad value stops the deploy before anything is built.
render_manifest >"$WORK/service.yaml"

if ((SKIP_BUILD)); then
    step "using image $IMAGE"
else
    step "building and pushing $IMAGE with Cloud Build"
    gcloud builds submit "$ROOT" --tag="$IMAGE" "${P[@]}"
fi

if ((SKIP_MIGRATIONS)); then
    step "skipping migrations"
else
    step "migrating the database (Cloud Run job ${SERVICE_NAME}-migrate)"
    # Same settings as the service, so Settings validates exactly as it will at start-up.
    cat >"$WORK/migrate-env.yaml" <<EOF
ENV: "production"
LLM_PROVIDER: "openai"
USE_CLOUD_SQL_CONNECTOR: "true"
DB_INSTANCE_CONNECTION_NAME: "$DB_INSTANCE_CONNECTION_NAME"
DB_NAME: "$DB_NAME"
DB_USER: "$DB_USER"
DB_IAM_AUTH: "true"
PUBSUB_PROJECT_ID: "$PROJECT_ID"
PUSH_AUTH: "$PUSH_AUTH"
PUSH_AUDIENCE: "$PUSH_AUDIENCE"
PUSH_SERVICE_ACCOUNTS: "$PUSH_SA"
API_AUTH: "$API_AUTH"
API_AUDIENCES: "$API_AUDIENCES"
API_ALLOWED_PRINCIPALS: "$API_ALLOWED_PRINCIPALS"
EOF
    gcloud run jobs deploy "${SERVICE_NAME}-migrate" --image="$IMAGE" --region="$REGION" \
        --service-account="$RECEIVER_SA" --set-cloudsql-instances="$DB_INSTANCE_CONNECTION_NAME" \
        --env-vars-file="$WORK/migrate-env.yaml" \
        --set-secrets="OPENAI_API_KEY=${OPENAI_SECRET}:latest" \
        --command=alembic --args=upgrade,head \
        --tasks=1 --max-retries=0 --task-timeout=600s \
        --execute-now --wait "${P[@]}"
fi

step "deploying $SERVICE_NAME (push auth $PUSH_AUTH)"
gcloud run services replace "$WORK/service.yaml" --region="$REGION" "${P[@]}"

URL="$(gcloud run services describe "$SERVICE_NAME" --region="$REGION" \
    --format='value(status.url)' "${P[@]}")"
step "deployed"
echo "    service URL:   $URL"
echo "    push endpoint: ${URL%/}/pubsub/push"
echo "    dead letters:  ${URL%/}/pubsub/dead-letter"
echo "    sweep:         ${URL%/}/tasks/sweep (Cloud Scheduler, every minute)"
echo "    next, if the push subscriptions and the sweep job do not point there yet:"
echo "      scripts/setup_gcp.sh --project=$PROJECT_ID --region=$REGION --service=$SERVICE_NAME --push-auth=$PUSH_AUTH --audience=$PUSH_AUDIENCE"
