#!/usr/bin/env bash
# One-time (and re-runnable) Google Cloud set-up for the consensus-engine push receiver.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/setup_gcp.sh [options]

Creates, or brings up to date, everything the push receiver needs around it:
  - APIs: run, pubsub, sqladmin, secretmanager, artifactregistry, iam, cloudbuild,
    cloudscheduler
  - Artifact Registry Docker repository for the image
  - service accounts: the receiver (Cloud Run runtime), the push identity and the build
    account (Cloud Build runs scripts/deploy.sh's build as it)
  - the build account's rights, no more: roles/logging.logWriter on the project,
    roles/artifactregistry.writer on the one repository, roles/storage.objectAdmin on the
    two Cloud Build buckets this creates, gs://<project>_<region>_cloudbuild (source) and
    gs://<project-number>-<region>-cloudbuild-logs (logs). deploy.sh builds with
    --default-buckets-behavior=regional-user-owned-bucket: these buckets are ours, not
    Google-managed, so the account reads the uploaded source and writes the build log
    there by its own IAM; a grant on each bucket (gcloud storage buckets
    add-iam-policy-binding) is the narrowest gcloud allows, where project-level
    storage.admin would open every bucket of the project. New projects (since 2024) give
    Cloud Build's default account no roles, so without this account builds fail.
  - the OpenAI key secret (empty; you add its value) and the receiver's access to it
  - topic, high-priority topic, dead-letter topic with a pull subscription that keeps
    dead letters, and one push subscription on each job topic to
    <service-url>/pubsub/push (OIDC token, ack deadline, retry policy, dead-letter
    policy; the same settings for both)
  - the dead-letter push subscription to <service-url>/pubsub/dead-letter (same OIDC
    identity and audience; no dead-letter policy of its own)
  - the Cloud Scheduler job that POSTs <service-url>/tasks/sweep every minute with an
    OIDC token of the push identity (stale-run sweep and outbox relay)
  - IAM: receiver -> cloudsql.client, cloudsql.instanceUser, secretAccessor on the
    secret, pubsub.publisher on both job topics; Pub/Sub service agent -> publisher on the
    dead-letter topic, subscriber on both push subscriptions (token creator on the push
    identity only with --legacy-pubsub-agent-token-creator); push identity -> run.invoker (cloud-run-iam mode only; it covers the
    sweep job too)
  - Cloud SQL (when the instance exists): the receiver's IAM database user and the database;
    warns when the database flags cloudsql.iam_authentication=on or max_connections (at
    least --max-connections, the connection budget in infra/cloudrun/README.md) are missing

Every step checks what exists first (describe before create, update when it exists);
IAM bindings are added idempotently. Safe to run again at any time.

Order: run this, then scripts/deploy.sh, then this again (the push subscriptions and the
sweep job need the service URL; it is looked up from the deployed service or taken from
--service-url).

Who runs it needs, besides admin rights on what it creates (roles/cloudscheduler.admin for
the job), iam.serviceAccounts.actAs on the push identity (roles/iam.serviceAccountUser on
it; owners have both): both push subscriptions and the Cloud Scheduler job sign their
tokens as that account. Whoever runs scripts/deploy.sh needs actAs on the build account
(roles/iam.serviceAccountUser on it): Cloud Build runs the build as that account. Cloud
Scheduler's service agent gets its own role by itself when
the API is enabled.

Options (environment variable in brackets; flags win over the environment):
  --project ID             Google Cloud project [PROJECT_ID; default: gcloud config]
  --region REGION          Cloud Run / Artifact Registry region [REGION; us-central1]
  --service NAME           Cloud Run service [SERVICE_NAME; consensus-engine]
  --service-url URL        receiver base URL [SERVICE_URL; default: looked up]
  --topic NAME             jobs topic [PUBSUB_TOPIC; consensus-engine-jobs]
  --subscription NAME      push subscription [PUBSUB_SUBSCRIPTION; consensus-engine-jobs-sub]
  --high-topic NAME        topic of priority=high jobs (= the service's
                           PUBSUB_HIGH_PRIORITY_TOPIC) [PUBSUB_HIGH_PRIORITY_TOPIC; <topic>-high]
  --high-subscription NAME push subscription on the high-priority topic
                           [PUBSUB_HIGH_PRIORITY_SUBSCRIPTION; <high-topic>-sub]
  --dlq-topic NAME         dead-letter topic [PUBSUB_DLQ_TOPIC; consensus-engine-jobs-dlq]
  --dlq-subscription NAME  pull subscription on the dead-letter topic
                           [PUBSUB_DLQ_SUBSCRIPTION; consensus-engine-jobs-dlq-sub]
  --dlq-push-subscription NAME
                           push subscription on the dead-letter topic, to /pubsub/dead-letter
                           [PUBSUB_DLQ_PUSH_SUBSCRIPTION; consensus-engine-jobs-dlq-push]
  --scheduler-job NAME     Cloud Scheduler job that POSTs /tasks/sweep
                           [SCHEDULER_JOB; consensus-engine-sweep]
  --scheduler-location LOC Cloud Scheduler region [SCHEDULER_LOCATION; the --region]
  --sweep-schedule CRON    when the sweep runs [SWEEP_SCHEDULE; "* * * * *", every minute]
  --receiver-sa NAME       receiver service account id [RECEIVER_SA_NAME; consensus-receiver]
  --build-sa NAME          Cloud Build service account id [BUILD_SA_NAME; consensus-builder]
  --push-sa NAME           push service account id [PUSH_SA_NAME; consensus-push-invoker]
  --push-auth MODE         oidc | cloud-run-iam [PUSH_AUTH; oidc]
  --audience VALUE         push token audience [PUSH_AUDIENCE; <service>-pubsub-push]
  --secret NAME            OpenAI key secret [OPENAI_SECRET; openai-api-key]
  --repository NAME        Artifact Registry repository [AR_REPOSITORY; consensus-engine]
  --sql-instance NAME      Cloud SQL instance name [SQL_INSTANCE; consensus-engine-db]
  --db-name NAME           database [DB_NAME; consensus_engine]
  --max-connections N      the instance's max_connections flag must be at least this
                           [MAX_CONNECTIONS; 150]: 5 instances x pool 10 x 2 revisions
                           during a rollout + migration + admin = 114 (infra/cloudrun/README.md)
  --ack-deadline SECONDS   ack deadline [ACK_DEADLINE; 600] (= WORKER_ACK_DEADLINE_SECONDS)
  --min-retry-delay DUR    [MIN_RETRY_DELAY; 10s]
  --max-retry-delay DUR    [MAX_RETRY_DELAY; 600s]
  --max-delivery-attempts N  [MAX_DELIVERY_ATTEMPTS; 5] (= the service's MAX_DELIVERY_ATTEMPTS)
  --legacy-pubsub-agent-token-creator
                           also grant the Pub/Sub service agent
                           roles/iam.serviceAccountTokenCreator on the push identity. Only
                           projects that enabled Pub/Sub before 8 April 2021 need it to sign
                           push tokens ("Authentication for push subscriptions"); elsewhere
                           it would only let the agent mint tokens as the push identity, so
                           it is off by default [LEGACY_PUBSUB_AGENT_TOKEN_CREATOR=1]. Off does
                           not remove an earlier grant: gcloud iam service-accounts
                           remove-iam-policy-binding does.
  --dry-run                print the changes instead of making them (lookups still run)
  -h, --help               show this help
EOF
}

PROJECT_ID="${PROJECT_ID:-}"
REGION="${REGION:-us-central1}"
SERVICE_NAME="${SERVICE_NAME:-consensus-engine}"
SERVICE_URL="${SERVICE_URL:-}"
PUBSUB_TOPIC="${PUBSUB_TOPIC:-consensus-engine-jobs}"
PUBSUB_SUBSCRIPTION="${PUBSUB_SUBSCRIPTION:-consensus-engine-jobs-sub}"
PUBSUB_HIGH_PRIORITY_TOPIC="${PUBSUB_HIGH_PRIORITY_TOPIC:-}"
PUBSUB_HIGH_PRIORITY_SUBSCRIPTION="${PUBSUB_HIGH_PRIORITY_SUBSCRIPTION:-}"
PUBSUB_DLQ_TOPIC="${PUBSUB_DLQ_TOPIC:-consensus-engine-jobs-dlq}"
PUBSUB_DLQ_SUBSCRIPTION="${PUBSUB_DLQ_SUBSCRIPTION:-consensus-engine-jobs-dlq-sub}"
PUBSUB_DLQ_PUSH_SUBSCRIPTION="${PUBSUB_DLQ_PUSH_SUBSCRIPTION:-consensus-engine-jobs-dlq-push}"
SCHEDULER_JOB="${SCHEDULER_JOB:-consensus-engine-sweep}"
SCHEDULER_LOCATION="${SCHEDULER_LOCATION:-}"
SWEEP_SCHEDULE="${SWEEP_SCHEDULE:-* * * * *}"
RECEIVER_SA_NAME="${RECEIVER_SA_NAME:-consensus-receiver}"
BUILD_SA_NAME="${BUILD_SA_NAME:-consensus-builder}"
LEGACY_PUBSUB_AGENT_TOKEN_CREATOR="${LEGACY_PUBSUB_AGENT_TOKEN_CREATOR:-0}"
PUSH_SA_NAME="${PUSH_SA_NAME:-consensus-push-invoker}"
PUSH_AUTH="${PUSH_AUTH:-oidc}"
PUSH_AUDIENCE="${PUSH_AUDIENCE:-}"
OPENAI_SECRET="${OPENAI_SECRET:-openai-api-key}"
AR_REPOSITORY="${AR_REPOSITORY:-consensus-engine}"
SQL_INSTANCE="${SQL_INSTANCE:-consensus-engine-db}"
DB_NAME="${DB_NAME:-consensus_engine}"
MAX_CONNECTIONS="${MAX_CONNECTIONS:-150}"
ACK_DEADLINE="${ACK_DEADLINE:-600}"
MIN_RETRY_DELAY="${MIN_RETRY_DELAY:-10s}"
MAX_RETRY_DELAY="${MAX_RETRY_DELAY:-600s}"
MAX_DELIVERY_ATTEMPTS="${MAX_DELIVERY_ATTEMPTS:-5}"
DRY_RUN=0

die() {
    echo "setup_gcp.sh: $*" >&2
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
        --service-url) need_value "$@"; SERVICE_URL="$2"; shift 2 ;;
        --topic) need_value "$@"; PUBSUB_TOPIC="$2"; shift 2 ;;
        --subscription) need_value "$@"; PUBSUB_SUBSCRIPTION="$2"; shift 2 ;;
        --high-topic) need_value "$@"; PUBSUB_HIGH_PRIORITY_TOPIC="$2"; shift 2 ;;
        --high-subscription) need_value "$@"; PUBSUB_HIGH_PRIORITY_SUBSCRIPTION="$2"; shift 2 ;;
        --dlq-topic) need_value "$@"; PUBSUB_DLQ_TOPIC="$2"; shift 2 ;;
        --dlq-subscription) need_value "$@"; PUBSUB_DLQ_SUBSCRIPTION="$2"; shift 2 ;;
        --dlq-push-subscription) need_value "$@"; PUBSUB_DLQ_PUSH_SUBSCRIPTION="$2"; shift 2 ;;
        --scheduler-job) need_value "$@"; SCHEDULER_JOB="$2"; shift 2 ;;
        --scheduler-location) need_value "$@"; SCHEDULER_LOCATION="$2"; shift 2 ;;
        --sweep-schedule) need_value "$@"; SWEEP_SCHEDULE="$2"; shift 2 ;;
        --receiver-sa) need_value "$@"; RECEIVER_SA_NAME="$2"; shift 2 ;;
        --build-sa) need_value "$@"; BUILD_SA_NAME="$2"; shift 2 ;;
        --legacy-pubsub-agent-token-creator) LEGACY_PUBSUB_AGENT_TOKEN_CREATOR=1; shift ;;
        --push-sa) need_value "$@"; PUSH_SA_NAME="$2"; shift 2 ;;
        --push-auth) need_value "$@"; PUSH_AUTH="$2"; shift 2 ;;
        --audience) need_value "$@"; PUSH_AUDIENCE="$2"; shift 2 ;;
        --secret) need_value "$@"; OPENAI_SECRET="$2"; shift 2 ;;
        --repository) need_value "$@"; AR_REPOSITORY="$2"; shift 2 ;;
        --sql-instance) need_value "$@"; SQL_INSTANCE="$2"; shift 2 ;;
        --db-name) need_value "$@"; DB_NAME="$2"; shift 2 ;;
        --max-connections) need_value "$@"; MAX_CONNECTIONS="$2"; shift 2 ;;
        --ack-deadline) need_value "$@"; ACK_DEADLINE="$2"; shift 2 ;;
        --min-retry-delay) need_value "$@"; MIN_RETRY_DELAY="$2"; shift 2 ;;
        --max-retry-delay) need_value "$@"; MAX_RETRY_DELAY="$2"; shift 2 ;;
        --max-delivery-attempts) need_value "$@"; MAX_DELIVERY_ATTEMPTS="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

case "$PUSH_AUTH" in
    oidc | cloud-run-iam) ;;
    *) die "--push-auth must be oidc or cloud-run-iam, not '$PUSH_AUTH'" ;;
esac
[[ "$LEGACY_PUBSUB_AGENT_TOKEN_CREATOR" =~ ^[01]$ ]] ||
    die "LEGACY_PUBSUB_AGENT_TOKEN_CREATOR must be 0 or 1"
if ! [[ "$ACK_DEADLINE" =~ ^[0-9]+$ ]] || ((ACK_DEADLINE < 10 || ACK_DEADLINE > 600)); then
    die "--ack-deadline must be 10..600 seconds"
fi
if ! [[ "$MAX_CONNECTIONS" =~ ^[0-9]+$ ]] || ((MAX_CONNECTIONS < 1)); then
    die "--max-connections must be a positive number"
fi
# The service's default for PUBSUB_HIGH_PRIORITY_TOPIC (app/settings.py), so the manifest
# need not set it.
PUBSUB_HIGH_PRIORITY_TOPIC="${PUBSUB_HIGH_PRIORITY_TOPIC:-${PUBSUB_TOPIC}-high}"
PUBSUB_HIGH_PRIORITY_SUBSCRIPTION="${PUBSUB_HIGH_PRIORITY_SUBSCRIPTION:-${PUBSUB_HIGH_PRIORITY_TOPIC}-sub}"
[[ "$PUBSUB_HIGH_PRIORITY_TOPIC" != "$PUBSUB_TOPIC" ]] ||
    die "--high-topic must differ from --topic"
[[ "$PUBSUB_HIGH_PRIORITY_SUBSCRIPTION" != "$PUBSUB_SUBSCRIPTION" ]] ||
    die "--high-subscription must differ from --subscription"
if ! [[ "$MAX_DELIVERY_ATTEMPTS" =~ ^[0-9]+$ ]] ||
    ((MAX_DELIVERY_ATTEMPTS < 5 || MAX_DELIVERY_ATTEMPTS > 100)); then
    die "--max-delivery-attempts must be 5..100 (Pub/Sub's range)"
fi

# Never wait for a prompt: this runs unattended as well as by hand.
export CLOUDSDK_CORE_DISABLE_PROMPTS=1

if [[ -z "$PROJECT_ID" ]]; then
    PROJECT_ID="$(gcloud config get-value project 2>/dev/null || true)"
fi
[[ -n "$PROJECT_ID" ]] || die "no project: pass --project or set PROJECT_ID"
PUSH_AUDIENCE="${PUSH_AUDIENCE:-${SERVICE_NAME}-pubsub-push}"
SCHEDULER_LOCATION="${SCHEDULER_LOCATION:-$REGION}"

RECEIVER_SA="${RECEIVER_SA_NAME}@${PROJECT_ID}.iam.gserviceaccount.com"
PUSH_SA="${PUSH_SA_NAME}@${PROJECT_ID}.iam.gserviceaccount.com"
BUILD_SA="${BUILD_SA_NAME}@${PROJECT_ID}.iam.gserviceaccount.com"
# Cloud SQL names an IAM database user after the service account, minus this suffix.
DB_USER="${RECEIVER_SA%.gserviceaccount.com}"
P=(--project="$PROJECT_ID")

step() {
    printf '\n==> %s\n' "$*"
}

# Runs a change, or prints it under --dry-run (on fd 3, the original stdout, so that
# callers silencing gcloud's output still show what would run).
exec 3>&1
run() {
    if ((DRY_RUN)); then
        {
            printf '[dry-run]'
            printf ' %q' "$@"
            printf '\n'
        } >&3
    else
        "$@"
    fi
}

# Newly created service accounts take a few seconds to be visible to IAM.
run_retry() {
    local attempt
    for attempt in 1 2 3 4 5; do
        if run "$@"; then
            return 0
        fi
        echo "    (retrying in $((attempt * 5))s)" >&2
        sleep $((attempt * 5))
    done
    die "gave up: $*"
}

exists() {
    "$@" "${P[@]}" --format="value(name)" >/dev/null 2>&1
}

step "project $PROJECT_ID, region $REGION, service $SERVICE_NAME, push auth $PUSH_AUTH"
PROJECT_NUMBER="$(gcloud projects describe "$PROJECT_ID" --format='value(projectNumber)')"
[[ -n "$PROJECT_NUMBER" ]] || die "cannot read the number of project $PROJECT_ID"
PUBSUB_AGENT="service-${PROJECT_NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"

step "APIs"
run gcloud services enable run.googleapis.com pubsub.googleapis.com sqladmin.googleapis.com \
    secretmanager.googleapis.com artifactregistry.googleapis.com iam.googleapis.com \
    cloudbuild.googleapis.com cloudscheduler.googleapis.com "${P[@]}"
# The Pub/Sub service agent signs push tokens and forwards dead letters; make sure it exists.
run gcloud beta services identity create --service=pubsub.googleapis.com "${P[@]}" ||
    echo "    (could not confirm the Pub/Sub service agent; it appears with the API)" >&2

step "Artifact Registry repository $AR_REPOSITORY"
if exists gcloud artifacts repositories describe "$AR_REPOSITORY" --location="$REGION"; then
    echo "    exists"
else
    run gcloud artifacts repositories create "$AR_REPOSITORY" --location="$REGION" \
        --repository-format=docker --description="consensus-engine images" "${P[@]}"
fi

step "service accounts"
ensure_service_account() {
    local name="$1" display="$2"
    if exists gcloud iam service-accounts describe "${name}@${PROJECT_ID}.iam.gserviceaccount.com"; then
        echo "    $name exists"
    else
        run gcloud iam service-accounts create "$name" --display-name="$display" "${P[@]}"
    fi
}
ensure_service_account "$RECEIVER_SA_NAME" "consensus-engine push receiver (Cloud Run)"
ensure_service_account "$PUSH_SA_NAME" "consensus-engine Pub/Sub push identity"
ensure_service_account "$BUILD_SA_NAME" "consensus-engine image builds (Cloud Build)"

step "build account $BUILD_SA_NAME: log writer, writer on $AR_REPOSITORY, its two buckets"
run_retry gcloud projects add-iam-policy-binding "$PROJECT_ID" \
    --member="serviceAccount:$BUILD_SA" --role=roles/logging.logWriter --condition=None \
    --quiet >/dev/null
run_retry gcloud artifacts repositories add-iam-policy-binding "$AR_REPOSITORY" \
    --location="$REGION" --member="serviceAccount:$BUILD_SA" \
    --role=roles/artifactregistry.writer "${P[@]}" >/dev/null
# The buckets gcloud builds submit --region=REGION --default-buckets-behavior=
# regional-user-owned-bucket uses (same names, so gcloud finds them instead of creating
# them): the uploaded source and the build's log.
for bucket in "gs://${PROJECT_ID}_${REGION}_cloudbuild" \
    "gs://${PROJECT_NUMBER}-${REGION}-cloudbuild-logs"; do
    if gcloud storage buckets describe "$bucket" "${P[@]}" --format='value(name)' \
        >/dev/null 2>&1; then
        echo "    $bucket exists"
    else
        run gcloud storage buckets create "$bucket" --location="$REGION" \
            --uniform-bucket-level-access "${P[@]}"
    fi
    run_retry gcloud storage buckets add-iam-policy-binding "$bucket" \
        --member="serviceAccount:$BUILD_SA" --role=roles/storage.objectAdmin "${P[@]}" \
        >/dev/null
done

step "receiver roles on the project: Cloud SQL client, IAM database login, trace writer"
# roles/cloudtrace.agent: with TRACING_ENABLED the receiver exports its spans to Cloud Trace.
for role in roles/cloudsql.client roles/cloudsql.instanceUser roles/cloudtrace.agent; do
    run_retry gcloud projects add-iam-policy-binding "$PROJECT_ID" \
        --member="serviceAccount:$RECEIVER_SA" --role="$role" --condition=None --quiet >/dev/null
done

step "secret $OPENAI_SECRET"
if exists gcloud secrets describe "$OPENAI_SECRET"; then
    echo "    exists"
else
    run gcloud secrets create "$OPENAI_SECRET" --replication-policy=automatic "${P[@]}"
fi
run_retry gcloud secrets add-iam-policy-binding "$OPENAI_SECRET" \
    --member="serviceAccount:$RECEIVER_SA" --role=roles/secretmanager.secretAccessor \
    "${P[@]}" >/dev/null
if [[ -z "$(gcloud secrets versions list "$OPENAI_SECRET" --filter=state:ENABLED --limit=1 \
    --format='value(name)' "${P[@]}" 2>/dev/null || true)" ]]; then
    # The key is never read from this script's environment: add it yourself, from stdin.
    echo "    no enabled version yet; add the key with:"
    echo "      printf '%s' \"\$OPENAI_API_KEY\" | gcloud secrets versions add $OPENAI_SECRET --data-file=- --project=$PROJECT_ID"
fi

step "topics $PUBSUB_TOPIC, $PUBSUB_HIGH_PRIORITY_TOPIC and $PUBSUB_DLQ_TOPIC"
for topic in "$PUBSUB_TOPIC" "$PUBSUB_HIGH_PRIORITY_TOPIC" "$PUBSUB_DLQ_TOPIC"; do
    if exists gcloud pubsub topics describe "$topic"; then
        echo "    $topic exists"
    else
        run gcloud pubsub topics create "$topic" "${P[@]}"
    fi
done
# /v1/full-review and the sweep publish jobs as the receiver, priority=high ones to the
# high-priority topic.
for topic in "$PUBSUB_TOPIC" "$PUBSUB_HIGH_PRIORITY_TOPIC"; do
    run_retry gcloud pubsub topics add-iam-policy-binding "$topic" \
        --member="serviceAccount:$RECEIVER_SA" --role=roles/pubsub.publisher "${P[@]}" >/dev/null
done
run_retry gcloud pubsub topics add-iam-policy-binding "$PUBSUB_DLQ_TOPIC" \
    --member="serviceAccount:$PUBSUB_AGENT" --role=roles/pubsub.publisher "${P[@]}" >/dev/null

step "dead-letter subscription $PUBSUB_DLQ_SUBSCRIPTION (keeps dead letters for inspection)"
# A topic without a subscription drops what is published to it; never expire this one.
if exists gcloud pubsub subscriptions describe "$PUBSUB_DLQ_SUBSCRIPTION"; then
    echo "    exists"
else
    run gcloud pubsub subscriptions create "$PUBSUB_DLQ_SUBSCRIPTION" \
        --topic="$PUBSUB_DLQ_TOPIC" --message-retention-duration=7d \
        --expiration-period=never "${P[@]}"
fi

if ((LEGACY_PUBSUB_AGENT_TOKEN_CREATOR)); then
    # Projects that enabled Pub/Sub before 8 April 2021 only: their agent needs the role to
    # sign push tokens. Newer projects sign without it (Google's own grant).
    step "push identity $PUSH_SA_NAME: the Pub/Sub service agent may mint its OIDC tokens (legacy)"
    run_retry gcloud iam service-accounts add-iam-policy-binding "$PUSH_SA" \
        --member="serviceAccount:$PUBSUB_AGENT" --role=roles/iam.serviceAccountTokenCreator \
        "${P[@]}" >/dev/null
else
    step "push identity $PUSH_SA_NAME: no token creator grant (--legacy-pubsub-agent-token-creator)"
fi

step "Cloud SQL instance $SQL_INSTANCE"
if exists gcloud sql instances describe "$SQL_INSTANCE"; then
    # Instance creation is a sizing and cost decision: infra/cloudrun/README.md.
    if [[ -n "$(gcloud sql users list --instance="$SQL_INSTANCE" --filter="name=\"$DB_USER\"" \
        --format='value(name)' "${P[@]}" 2>/dev/null || true)" ]]; then
        echo "    IAM database user $DB_USER exists"
    else
        run gcloud sql users create "$DB_USER" --instance="$SQL_INSTANCE" \
            --type=cloud_iam_service_account "${P[@]}"
    fi
    if exists gcloud sql databases describe "$DB_NAME" --instance="$SQL_INSTANCE"; then
        echo "    database $DB_NAME exists"
    else
        run gcloud sql databases create "$DB_NAME" --instance="$SQL_INSTANCE" "${P[@]}"
    fi
    DB_FLAGS="$(gcloud sql instances describe "$SQL_INSTANCE" --flatten=settings.databaseFlags \
        --format='value(settings.databaseFlags.name,settings.databaseFlags.value)' \
        "${P[@]}" 2>/dev/null || true)"
    # Not patched from here: setting database flags replaces them all and restarts.
    if ! grep -q '^cloudsql.iam_authentication[[:space:]]on$' <<<"$DB_FLAGS"; then
        echo "    WARNING: IAM database authentication is off; set the database flag"
        echo "    cloudsql.iam_authentication=on on $SQL_INSTANCE (infra/cloudrun/README.md)"
    fi
    CURRENT_MAX_CONNECTIONS="$(awk '$1 == "max_connections" {print $2}' <<<"$DB_FLAGS")"
    if [[ ! "$CURRENT_MAX_CONNECTIONS" =~ ^[0-9]+$ ]] \
        || ((CURRENT_MAX_CONNECTIONS < MAX_CONNECTIONS)); then
        echo "    WARNING: max_connections is ${CURRENT_MAX_CONNECTIONS:-the tier default}, below"
        echo "    the connection budget; set the database flag max_connections=$MAX_CONNECTIONS"
        echo "    on $SQL_INSTANCE, keeping the others (infra/cloudrun/README.md), e.g."
        echo "    gcloud sql instances patch $SQL_INSTANCE" \
            "--database-flags=cloudsql.iam_authentication=on,max_connections=$MAX_CONNECTIONS"
    fi
    echo "    grant $DB_USER rights in $DB_NAME once (infra/cloudrun/README.md, 'Database')"
else
    echo "    not found: create it (infra/cloudrun/README.md), then run this again"
fi

step "push subscriptions and the sweep job (they need the service URL)"
if [[ -z "$SERVICE_URL" ]]; then
    SERVICE_URL="$(gcloud run services describe "$SERVICE_NAME" --region="$REGION" \
        --format='value(status.url)' "${P[@]}" 2>/dev/null || true)"
fi
if [[ -z "$SERVICE_URL" ]]; then
    echo "    service $SERVICE_NAME is not deployed yet: run scripts/deploy.sh, then this again"
    echo "    (or pass --service-url)"
    exit 0
fi
PUSH_ENDPOINT="${SERVICE_URL%/}/pubsub/push"
DEAD_LETTER_ENDPOINT="${SERVICE_URL%/}/pubsub/dead-letter"
SWEEP_ENDPOINT="${SERVICE_URL%/}/tasks/sweep"

step "push subscriptions $PUBSUB_SUBSCRIPTION and $PUBSUB_HIGH_PRIORITY_SUBSCRIPTION"
echo "    endpoint $PUSH_ENDPOINT, audience $PUSH_AUDIENCE"
# Both job topics push to the same endpoint with the same settings. The high-priority one
# has its own backlog and its own push rate (Pub/Sub slows a subscription down after 503s),
# so priority=high jobs never wait behind the normal backlog.
SUBSCRIPTION_FLAGS=(
    --push-endpoint="$PUSH_ENDPOINT"
    --push-auth-service-account="$PUSH_SA"
    --push-auth-token-audience="$PUSH_AUDIENCE"
    --ack-deadline="$ACK_DEADLINE"
    --min-retry-delay="$MIN_RETRY_DELAY"
    --max-retry-delay="$MAX_RETRY_DELAY"
    --dead-letter-topic="$PUBSUB_DLQ_TOPIC"
    --max-delivery-attempts="$MAX_DELIVERY_ATTEMPTS"
    --message-retention-duration=7d
    --expiration-period=never
)
ensure_push_subscription() {
    local subscription="$1" topic="$2"
    if exists gcloud pubsub subscriptions describe "$subscription"; then
        run gcloud pubsub subscriptions update "$subscription" "${SUBSCRIPTION_FLAGS[@]}" \
            "${P[@]}"
    else
        run gcloud pubsub subscriptions create "$subscription" --topic="$topic" \
            "${SUBSCRIPTION_FLAGS[@]}" "${P[@]}"
    fi
    # The service agent acknowledges the messages it forwards to the dead-letter topic.
    run_retry gcloud pubsub subscriptions add-iam-policy-binding "$subscription" \
        --member="serviceAccount:$PUBSUB_AGENT" --role=roles/pubsub.subscriber "${P[@]}" \
        >/dev/null
}
ensure_push_subscription "$PUBSUB_SUBSCRIPTION" "$PUBSUB_TOPIC"
ensure_push_subscription "$PUBSUB_HIGH_PRIORITY_SUBSCRIPTION" "$PUBSUB_HIGH_PRIORITY_TOPIC"

step "dead-letter push subscription $PUBSUB_DLQ_PUSH_SUBSCRIPTION"
echo "    endpoint $DEAD_LETTER_ENDPOINT, audience $PUSH_AUDIENCE"
# Every dead letter reaches both subscriptions of the dead-letter topic: this one hands it
# to the service (re-enqueue the run while the job timeout allows, else fail it), the pull
# subscription above keeps the raw message for operators.
# No dead-letter policy here, on purpose: the receiver acknowledges (204) every dead
# letter it is handed, whatever the run's state, so Pub/Sub retries only while the service
# is unreachable, refusing (401/403) or busy (503), and retrying is then exactly right; a
# message dead-lettered from here would have nowhere better to go, as the pull
# subscription already keeps a copy. The 7-day retention bounds those retries.
DLQ_PUSH_FLAGS=(
    --push-endpoint="$DEAD_LETTER_ENDPOINT"
    --push-auth-service-account="$PUSH_SA"
    --push-auth-token-audience="$PUSH_AUDIENCE"
    --ack-deadline="$ACK_DEADLINE"
    --min-retry-delay="$MIN_RETRY_DELAY"
    --max-retry-delay="$MAX_RETRY_DELAY"
    --message-retention-duration=7d
    --expiration-period=never
)
if exists gcloud pubsub subscriptions describe "$PUBSUB_DLQ_PUSH_SUBSCRIPTION"; then
    # Also removes a dead-letter policy someone may have added by hand.
    run gcloud pubsub subscriptions update "$PUBSUB_DLQ_PUSH_SUBSCRIPTION" \
        "${DLQ_PUSH_FLAGS[@]}" --clear-dead-letter-policy "${P[@]}"
else
    run gcloud pubsub subscriptions create "$PUBSUB_DLQ_PUSH_SUBSCRIPTION" \
        --topic="$PUBSUB_DLQ_TOPIC" "${DLQ_PUSH_FLAGS[@]}" "${P[@]}"
fi

if [[ "$PUSH_AUTH" == cloud-run-iam ]]; then
    step "cloud-run-iam: only the push identity may invoke $SERVICE_NAME"
    run_retry gcloud run services add-iam-policy-binding "$SERVICE_NAME" --region="$REGION" \
        --member="serviceAccount:$PUSH_SA" --role=roles/run.invoker "${P[@]}" >/dev/null
else
    step "oidc: the app verifies push tokens itself; no run.invoker binding needed"
fi

step "Cloud Scheduler job $SCHEDULER_JOB ($SCHEDULER_LOCATION): POST $SWEEP_ENDPOINT"
# The stale-run sweep and the outbox relay must run even when no push arrives: with CPU
# allocated only during requests (infra/cloudrun/README.md) an idle instance's timer barely
# runs, and an instance scaled to zero runs nothing. So a request triggers them. The token
# is the push identity's, with the push audience, so the app's push verification (oidc) or
# Cloud Run's invoker check (cloud-run-iam, where that account holds run.invoker) admits it.
# No retries: the next minute's tick is the retry. The sweep answers in well under a minute.
SCHEDULER_FLAGS=(
    --location="$SCHEDULER_LOCATION"
    --schedule="$SWEEP_SCHEDULE"
    --time-zone=Etc/UTC
    --uri="$SWEEP_ENDPOINT"
    --http-method=POST
    --oidc-service-account-email="$PUSH_SA"
    --oidc-token-audience="$PUSH_AUDIENCE"
    --attempt-deadline=60s
    --max-retry-attempts=0
    --description="consensus-engine: re-enqueue stale runs, republish unpublished ones"
)
if exists gcloud scheduler jobs describe "$SCHEDULER_JOB" --location="$SCHEDULER_LOCATION"; then
    run gcloud scheduler jobs update http "$SCHEDULER_JOB" "${SCHEDULER_FLAGS[@]}" "${P[@]}"
else
    run gcloud scheduler jobs create http "$SCHEDULER_JOB" "${SCHEDULER_FLAGS[@]}" "${P[@]}"
fi

step "done"
echo "    jobs:         projects/$PROJECT_ID/topics/$PUBSUB_TOPIC"
echo "    push:         $PUBSUB_SUBSCRIPTION -> $PUSH_ENDPOINT"
echo "    high:         projects/$PROJECT_ID/topics/$PUBSUB_HIGH_PRIORITY_TOPIC"
echo "                  $PUBSUB_HIGH_PRIORITY_SUBSCRIPTION -> $PUSH_ENDPOINT"
echo "    dead letters: $PUBSUB_DLQ_PUSH_SUBSCRIPTION -> $DEAD_LETTER_ENDPOINT"
echo "                  $PUBSUB_DLQ_SUBSCRIPTION keeps them (gcloud pubsub subscriptions pull $PUBSUB_DLQ_SUBSCRIPTION --project=$PROJECT_ID)"
echo "    sweep:        $SCHEDULER_JOB ($SWEEP_SCHEDULE) -> POST $SWEEP_ENDPOINT"
