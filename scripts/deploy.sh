#!/usr/bin/env bash
# Build, push and deploy the consensus-engine push receiver to Cloud Run.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/deploy.sh [options]

  1. builds the image with Cloud Build and pushes it to Artifact Registry
     (gcloud builds submit --tag REGION-docker.pkg.dev/PROJECT/REPOSITORY/SERVICE:TAG), as
     the build service account setup_gcp.sh makes (--build-sa), with Cloud Build's
     regional buckets owned by the project (--default-buckets-behavior=
     regional-user-owned-bucket). It uploads what .gcloudignore leaves: no .env, no .git.
  2. migrates the database: Cloud Run job <service>-migrate runs `alembic upgrade head`
     with the image and the service's database settings (the service refuses work while
     its schema is behind)
  3. renders infra/cloudrun/service.yaml (every ${NAME} placeholder) and applies it with
     gcloud run services replace. The OpenAI key is pinned to a version of its secret: the
     newest enabled one at deploy time (--secret-version to choose), never `latest`, so a
     new version reaches no instance until a deploy (key rotation: --rotate-openai-key)
  4. prints the service URL, the endpoints that Pub/Sub and Cloud Scheduler call
     (/pubsub/push, /pubsub/dead-letter, /tasks/sweep) and how to mint a /v1 token

/v1 callers' ID tokens must be minted for this service: their audience (API_AUDIENCES) is
the service's URL, https://SERVICE-PROJECT_NUMBER.REGION.run.app, or --api-audience. Mint
one as a service account you may impersonate (roles/iam.serviceAccountTokenCreator on it),
listed in --api-principals:
  gcloud auth print-identity-token --audiences=AUDIENCE --include-email \
    --impersonate-service-account=SA
(user accounts cannot mint a token for an audience of their choosing; --include-email adds
the email claim the app checks). A token gcloud mints for anything else (its shared client
id, 32555940559.apps.googleusercontent.com) is refused, unless --allow-gcloud-audience
(API_ALLOW_GCLOUD_AUDIENCE=true, warned at start-up): then any token an allowed person
minted for any other purpose works here too.

Who runs it needs iam.serviceAccounts.actAs on the build service account
(roles/iam.serviceAccountUser on it) as well as on the receiver's: Cloud Build runs the build
as the one, Cloud Run the service and the migration job as the other.

Key rotation, one command (adds the key from stdin as a new version, redeploys the running
image pinned to it; the old version stays enabled until you disable it):
  printf '%s' "$NEW_KEY" | scripts/deploy.sh --rotate-openai-key [options]

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
                         The migration job dials it at DB_IP_TYPE (public | private | psc;
                         default public): keep it equal to the manifest's DB_IP_TYPE; private
                         and psc also need the job's VPC egress (--network/--subnet).
  --db-name NAME         database [DB_NAME; consensus_engine]
  --db-user USER         IAM database user [receiver service account email minus
                         .gserviceaccount.com]
  --receiver-sa NAME     runtime service account id [RECEIVER_SA_NAME; consensus-receiver]
  --push-sa NAME         push service account id [PUSH_SA_NAME; consensus-push-invoker]
  --push-auth MODE       oidc | cloud-run-iam [PUSH_AUTH; oidc]
  --audience VALUE       push token audience [PUSH_AUDIENCE; <service>-pubsub-push]
  --api-principals LIST  emails allowed to call /v1 when --push-auth=oidc, comma-separated
                         [API_ALLOWED_PRINCIPALS; the active gcloud account]
  --api-audience VALUE   audience of /v1 callers' ID tokens (a custom audience; in
                         cloud-run-iam mode Cloud Run accepts it too) [API_AUDIENCE; the
                         service URL https://<service>-<project number>.<region>.run.app]
  --allow-gcloud-audience
                         also accept gcloud's shared client id as audience (replayable
                         across services: avoid) [ALLOW_GCLOUD_AUDIENCE=1]
  --project-number N     project number, for the service URL [PROJECT_NUMBER; looked up]
  --topic NAME           jobs topic [PUBSUB_TOPIC; consensus-engine-jobs]
  --subscription NAME    push subscription [PUBSUB_SUBSCRIPTION; consensus-engine-jobs-sub]
  --secret NAME          OpenAI key secret [OPENAI_SECRET; openai-api-key]
  --secret-version N     version of it the service reads [OPENAI_SECRET_VERSION; the newest
                         enabled one]
  --rotate-openai-key    read a new OpenAI key from stdin, add it as a version of the secret
                         and redeploy the running image (or --image) pinned to it; no build,
                         no migrations
  --build-sa NAME        Cloud Build service account id [BUILD_SA_NAME; consensus-builder]
  --openai-model NAME    [OPENAI_MODEL; gpt-5.1]
  --skip-build           deploy an image that is already pushed
  --skip-migrations      do not run the migration job
  --render-only          print the rendered manifest and exit (calls no gcloud; needs
                         --secret-version, and --api-audience or --project-number)
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
# The migration job's address of the instance; keep it equal to the manifest's DB_IP_TYPE.
DB_IP_TYPE="${DB_IP_TYPE:-public}"
DB_NAME="${DB_NAME:-consensus_engine}"
# Not read from the environment: a developer's DB_USER (e.g. postgres) is not the IAM user.
DB_USER_OVERRIDE=""
RECEIVER_SA_NAME="${RECEIVER_SA_NAME:-consensus-receiver}"
PUSH_SA_NAME="${PUSH_SA_NAME:-consensus-push-invoker}"
PUSH_AUTH="${PUSH_AUTH:-oidc}"
PUSH_AUDIENCE="${PUSH_AUDIENCE:-}"
API_ALLOWED_PRINCIPALS="${API_ALLOWED_PRINCIPALS:-}"
API_AUDIENCE="${API_AUDIENCE:-}"
ALLOW_GCLOUD_AUDIENCE="${ALLOW_GCLOUD_AUDIENCE:-0}"
# The `aud` of `gcloud auth print-identity-token` for a user account (gcloud's OAuth client).
GCLOUD_CLI_AUDIENCE=32555940559.apps.googleusercontent.com
PROJECT_NUMBER="${PROJECT_NUMBER:-}"
PUBSUB_TOPIC="${PUBSUB_TOPIC:-consensus-engine-jobs}"
PUBSUB_SUBSCRIPTION="${PUBSUB_SUBSCRIPTION:-consensus-engine-jobs-sub}"
OPENAI_SECRET="${OPENAI_SECRET:-openai-api-key}"
OPENAI_SECRET_VERSION="${OPENAI_SECRET_VERSION:-}"
ROTATE_OPENAI_KEY=0
BUILD_SA_NAME="${BUILD_SA_NAME:-consensus-builder}"
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
        --api-audience) need_value "$@"; API_AUDIENCE="$2"; shift 2 ;;
        --allow-gcloud-audience) ALLOW_GCLOUD_AUDIENCE=1; shift ;;
        --project-number) need_value "$@"; PROJECT_NUMBER="$2"; shift 2 ;;
        --topic) need_value "$@"; PUBSUB_TOPIC="$2"; shift 2 ;;
        --subscription) need_value "$@"; PUBSUB_SUBSCRIPTION="$2"; shift 2 ;;
        --secret) need_value "$@"; OPENAI_SECRET="$2"; shift 2 ;;
        --secret-version) need_value "$@"; OPENAI_SECRET_VERSION="$2"; shift 2 ;;
        --rotate-openai-key) ROTATE_OPENAI_KEY=1; shift ;;
        --build-sa) need_value "$@"; BUILD_SA_NAME="$2"; shift 2 ;;
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

[[ "$ALLOW_GCLOUD_AUDIENCE" =~ ^[01]$ ]] || die "ALLOW_GCLOUD_AUDIENCE must be 0 or 1"
[[ -z "$OPENAI_SECRET_VERSION" || "$OPENAI_SECRET_VERSION" =~ ^[1-9][0-9]*$ ]] ||
    die "--secret-version must be a version number, not '$OPENAI_SECRET_VERSION' (never latest)"
[[ -z "$PROJECT_NUMBER" || "$PROJECT_NUMBER" =~ ^[0-9]+$ ]] ||
    die "--project-number must be a number"
if ((ROTATE_OPENAI_KEY)); then
    ((RENDER_ONLY == 0)) || die "--rotate-openai-key and --render-only exclude each other"
    [[ -z "$OPENAI_SECRET_VERSION" ]] || die "--rotate-openai-key pins the version it adds"
    [[ ! -t 0 ]] || die "--rotate-openai-key reads the key from stdin: pipe it in"
fi

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
if ((RENDER_ONLY)); then
    [[ -n "$OPENAI_SECRET_VERSION" ]] || die "--render-only needs --secret-version"
    [[ -n "$API_AUDIENCE" || -n "$PROJECT_NUMBER" ]] ||
        die "--render-only needs --api-audience or --project-number (for the service URL)"
fi

if ((ROTATE_OPENAI_KEY)); then
    # Only the key changes: the running image, its schema already migrated.
    SKIP_MIGRATIONS=1
    if [[ -z "$IMAGE" ]]; then
        IMAGE="$(gcloud run services describe "$SERVICE_NAME" --region="$REGION" \
            --format='value(spec.template.spec.containers[0].image)' \
            --project="$PROJECT_ID" 2>/dev/null || true)"
        [[ -n "$IMAGE" ]] ||
            die "--rotate-openai-key redeploys the running image: $SERVICE_NAME is not deployed (pass --image)"
    fi
fi

if [[ -z "$API_AUDIENCE" ]]; then
    # The service's deterministic URL, known before its first deploy (Cloud Run accepts it
    # as audience alongside the older hashed URL).
    if [[ -z "$PROJECT_NUMBER" ]]; then
        PROJECT_NUMBER="$(gcloud projects describe "$PROJECT_ID" --format='value(projectNumber)')"
    fi
    [[ -n "$PROJECT_NUMBER" ]] || die "cannot read the number of project $PROJECT_ID"
    API_AUDIENCE="https://${SERVICE_NAME}-${PROJECT_NUMBER}.${REGION}.run.app"
fi
[[ "$API_AUDIENCE" != "$GCLOUD_CLI_AUDIENCE" ]] ||
    die "--api-audience must be this service's own; gcloud's client id: --allow-gcloud-audience"
API_AUDIENCES="$API_AUDIENCE"
API_ALLOW_GCLOUD_AUDIENCE=false
if ((ALLOW_GCLOUD_AUDIENCE)); then
    API_AUDIENCES="${API_AUDIENCE},${GCLOUD_CLI_AUDIENCE}"
    API_ALLOW_GCLOUD_AUDIENCE=true
    echo "deploy.sh: WARNING: --allow-gcloud-audience: /v1 also accepts tokens minted for gcloud's shared client id, which any allowed person's token for any other purpose carries (replayable across services)" >&2
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
BUILD_SA="${BUILD_SA_NAME}@${PROJECT_ID}.iam.gserviceaccount.com"
# Cloud SQL names an IAM database user after the service account, minus this suffix.
DB_USER="${DB_USER_OVERRIDE:-${RECEIVER_SA%.gserviceaccount.com}}"
DB_INSTANCE_CONNECTION_NAME="${DB_INSTANCE_CONNECTION_NAME:-${PROJECT_ID}:${REGION}:${SQL_INSTANCE}}"
PUSH_AUDIENCE="${PUSH_AUDIENCE:-${SERVICE_NAME}-pubsub-push}"

# The manifest's placeholders, in the order its header documents them.
PLACEHOLDERS=(
    SERVICE_NAME REGION IMAGE PROJECT_ID RECEIVER_SA PUSH_SA PUSH_AUTH INVOKER_IAM_DISABLED
    PUSH_AUDIENCE API_AUTH API_AUDIENCE API_AUDIENCES API_ALLOW_GCLOUD_AUDIENCE
    API_ALLOWED_PRINCIPALS
    DB_INSTANCE_CONNECTION_NAME DB_NAME DB_USER PUBSUB_TOPIC PUBSUB_SUBSCRIPTION OPENAI_SECRET
    OPENAI_SECRET_VERSION OPENAI_MODEL
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

PREVIOUS_SECRET_VERSION=""
newest_secret_version() {
    gcloud secrets versions list "$OPENAI_SECRET" --filter=state=ENABLED \
        --sort-by=~createTime --limit=1 --format='value(name.basename())' "${P[@]}"
}
if ((ROTATE_OPENAI_KEY)); then
    PREVIOUS_SECRET_VERSION="$(newest_secret_version)"
    step "adding the new OpenAI key (stdin) as a version of secret $OPENAI_SECRET"
    gcloud secrets versions add "$OPENAI_SECRET" --data-file=- "${P[@]}" >/dev/null
fi
if [[ -z "$OPENAI_SECRET_VERSION" ]]; then
    # Pinned: an environment-variable secret is read when an instance starts, so `latest`
    # would let instances of one revision run with different keys after a rotation.
    OPENAI_SECRET_VERSION="$(newest_secret_version)"
    [[ -n "$OPENAI_SECRET_VERSION" ]] ||
        die "secret $OPENAI_SECRET has no enabled version: add the key (scripts/setup_gcp.sh says how)"
    [[ "$OPENAI_SECRET_VERSION" =~ ^[1-9][0-9]*$ ]] ||
        die "unexpected version of secret $OPENAI_SECRET: '$OPENAI_SECRET_VERSION'"
fi

# Rendered first, so a bad value stops the deploy before anything is built.
render_manifest >"$WORK/service.yaml"

if ((SKIP_BUILD)); then
    step "using image $IMAGE"
else
    step "building and pushing $IMAGE with Cloud Build"
    # As the build account (new projects give Cloud Build's default one no roles), with the
    # project's own regional buckets, whose rights setup_gcp.sh gave that account.
    gcloud builds submit "$ROOT" --tag="$IMAGE" --region="$REGION" \
        --service-account="projects/${PROJECT_ID}/serviceAccounts/${BUILD_SA}" \
        --default-buckets-behavior=regional-user-owned-bucket "${P[@]}"
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
API_ALLOW_GCLOUD_AUDIENCE: "$API_ALLOW_GCLOUD_AUDIENCE"
API_ALLOWED_PRINCIPALS: "$API_ALLOWED_PRINCIPALS"
DB_IP_TYPE: "$DB_IP_TYPE"
EOF
    # No --set-cloudsql-instances: alembic dials through the Python connector, like the service.
    gcloud run jobs deploy "${SERVICE_NAME}-migrate" --image="$IMAGE" --region="$REGION" \
        --service-account="$RECEIVER_SA" \
        --env-vars-file="$WORK/migrate-env.yaml" \
        --set-secrets="OPENAI_API_KEY=${OPENAI_SECRET}:${OPENAI_SECRET_VERSION}" \
        --command=alembic --args=upgrade,head \
        --tasks=1 --max-retries=0 --task-timeout=600s \
        --execute-now --wait "${P[@]}"
fi

step "deploying $SERVICE_NAME (push auth $PUSH_AUTH, OpenAI key version $OPENAI_SECRET_VERSION)"
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
if [[ "$API_AUTH" == oidc ]]; then
    MINTER="${API_ALLOWED_PRINCIPALS%%,*}"
    [[ "$MINTER" == *.gserviceaccount.com ]] || MINTER="SERVICE_ACCOUNT_IN_API_ALLOWED_PRINCIPALS"
else
    MINTER="SERVICE_ACCOUNT_WITH_RUN_INVOKER"
fi
echo "    /v1 token (audience $API_AUDIENCE):"
echo "      gcloud auth print-identity-token --audiences=$API_AUDIENCE --include-email --impersonate-service-account=$MINTER"
if [[ "$API_AUTH" == oidc && ",$API_ALLOWED_PRINCIPALS," != *.gserviceaccount.com,* ]]; then
    echo "    note: no service account in --api-principals; a user account cannot mint a token"
    echo "    for $API_AUDIENCE: list the service account callers impersonate"
fi
if [[ -n "$PREVIOUS_SECRET_VERSION" && "$PREVIOUS_SECRET_VERSION" != "$OPENAI_SECRET_VERSION" ]]; then
    echo "    key rotated: version $PREVIOUS_SECRET_VERSION -> $OPENAI_SECRET_VERSION; once no revision uses the old one:"
    echo "      gcloud secrets versions disable $PREVIOUS_SECRET_VERSION --secret=$OPENAI_SECRET --project=$PROJECT_ID"
fi
