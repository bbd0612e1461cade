#!/usr/bin/env bash
# Log-based metrics, alert policies and the dashboard of the consensus-engine push receiver.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/setup_monitoring.sh [options]

Creates, or brings up to date, the monitoring of the push receiver, from the files in
infra/monitoring/ (infra/monitoring/README.md says what each one is):
  - log-based metrics (metrics/*.yaml): job outcomes, job and step latency, tokens and
    cost by model, quarantined messages, provider misconfigured, container starts
  - alert policies (policies/*.yaml): error rate, queue backlog, p95 job latency,
    container restarts, dead letters waiting, LLM provider misconfigured; each notifies
    the channels given with --notification-channel
  - the dashboard (dashboards/*.yaml)

Run it after scripts/setup_gcp.sh (it names the subscriptions the policies watch), with
the same names. Safe to run again at any time: a metric is updated when its name exists,
a policy or the dashboard when one with the same displayName exists (two with the same
displayName stop the script: delete one). What the files say wins: an update replaces
the policy or dashboard, notification channels included, so pass the same channels
every time. The ${NAME} placeholders in the files are filled from the options below.

Needs the alpha gcloud commands for alert policies (`gcloud components install alpha`
where gcloud came from the SDK installer), and roles/logging.configWriter and
roles/monitoring.editor on the project (owners have both).

Options (environment variable in brackets; flags win over the environment):
  --project ID             Google Cloud project [PROJECT_ID; default: gcloud config]
  --service NAME           Cloud Run service [SERVICE_NAME; consensus-engine]
  --topic NAME             jobs topic, to derive the default high-priority names
                           [PUBSUB_TOPIC; consensus-engine-jobs]
  --subscription NAME      push subscription of the jobs topic
                           [PUBSUB_SUBSCRIPTION; consensus-engine-jobs-sub]
  --high-topic NAME        high-priority topic [PUBSUB_HIGH_PRIORITY_TOPIC; <topic>-high]
  --high-subscription NAME push subscription of the high-priority topic
                           [PUBSUB_HIGH_PRIORITY_SUBSCRIPTION; <high-topic>-sub]
  --dlq-subscription NAME  pull subscription that keeps dead letters
                           [PUBSUB_DLQ_SUBSCRIPTION; consensus-engine-jobs-dlq-sub]
  --notification-channel CHANNEL
                           a notification channel every policy notifies: its id or
                           projects/PROJECT/notificationChannels/ID; repeat for more
                           [NOTIFICATION_CHANNELS, comma-separated]. List them with
                           gcloud beta monitoring channels list
  --no-notifications       make the policies without notification channels (incidents
                           open in the console only); needed when no channel is given
  --dry-run                print the changes instead of making them (lookups still run)
  -h, --help               show this help
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MONITORING="$ROOT/infra/monitoring"

PROJECT_ID="${PROJECT_ID:-}"
SERVICE_NAME="${SERVICE_NAME:-consensus-engine}"
PUBSUB_TOPIC="${PUBSUB_TOPIC:-consensus-engine-jobs}"
PUBSUB_SUBSCRIPTION="${PUBSUB_SUBSCRIPTION:-consensus-engine-jobs-sub}"
PUBSUB_HIGH_PRIORITY_TOPIC="${PUBSUB_HIGH_PRIORITY_TOPIC:-}"
PUBSUB_HIGH_PRIORITY_SUBSCRIPTION="${PUBSUB_HIGH_PRIORITY_SUBSCRIPTION:-}"
PUBSUB_DLQ_SUBSCRIPTION="${PUBSUB_DLQ_SUBSCRIPTION:-consensus-engine-jobs-dlq-sub}"
NOTIFICATION_CHANNELS="${NOTIFICATION_CHANNELS:-}"
CHANNELS=()
NO_NOTIFICATIONS=0
DRY_RUN=0

die() {
    echo "setup_monitoring.sh: $*" >&2
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
        --service) need_value "$@"; SERVICE_NAME="$2"; shift 2 ;;
        --topic) need_value "$@"; PUBSUB_TOPIC="$2"; shift 2 ;;
        --subscription) need_value "$@"; PUBSUB_SUBSCRIPTION="$2"; shift 2 ;;
        --high-topic) need_value "$@"; PUBSUB_HIGH_PRIORITY_TOPIC="$2"; shift 2 ;;
        --high-subscription) need_value "$@"; PUBSUB_HIGH_PRIORITY_SUBSCRIPTION="$2"; shift 2 ;;
        --dlq-subscription) need_value "$@"; PUBSUB_DLQ_SUBSCRIPTION="$2"; shift 2 ;;
        --notification-channel) need_value "$@"; CHANNELS+=("$2"); shift 2 ;;
        --no-notifications) NO_NOTIFICATIONS=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

# The same defaults as scripts/setup_gcp.sh.
PUBSUB_HIGH_PRIORITY_TOPIC="${PUBSUB_HIGH_PRIORITY_TOPIC:-${PUBSUB_TOPIC}-high}"
PUBSUB_HIGH_PRIORITY_SUBSCRIPTION="${PUBSUB_HIGH_PRIORITY_SUBSCRIPTION:-${PUBSUB_HIGH_PRIORITY_TOPIC}-sub}"

if ((${#CHANNELS[@]} == 0)) && [[ -n "$NOTIFICATION_CHANNELS" ]]; then
    IFS=, read -r -a CHANNELS <<<"$NOTIFICATION_CHANNELS"
fi
if ((${#CHANNELS[@]} == 0 && !NO_NOTIFICATIONS)); then
    die "no notification channel: pass --notification-channel (gcloud beta monitoring channels list), or --no-notifications for policies that notify nobody"
fi
if ((${#CHANNELS[@]} > 0 && NO_NOTIFICATIONS)); then
    die "--no-notifications contradicts the notification channels given"
fi
CHANNEL_LIST="$(IFS=,; printf '%s' "${CHANNELS[*]-}")"
[[ -z "$CHANNEL_LIST" || "$CHANNEL_LIST" =~ ^[A-Za-z0-9/_-]+(,[A-Za-z0-9/_-]+)*$ ]] ||
    die "not notification channel ids or names: '$CHANNEL_LIST'"

# Placeholders in infra/monitoring/ and what fills them. The values end up inside quoted
# filter strings: Pub/Sub and Cloud Run names never need quotes, so none are allowed.
PLACEHOLDERS=(SERVICE_NAME SUBSCRIPTION HIGH_SUBSCRIPTION DLQ_SUBSCRIPTION)
SUBSCRIPTION="$PUBSUB_SUBSCRIPTION"
HIGH_SUBSCRIPTION="$PUBSUB_HIGH_PRIORITY_SUBSCRIPTION"
DLQ_SUBSCRIPTION="$PUBSUB_DLQ_SUBSCRIPTION"
for name in "${PLACEHOLDERS[@]}"; do
    [[ "${!name}" =~ ^[A-Za-z0-9._~+%-]+$ ]] || die "$name '${!name}' is not a Cloud Run or Pub/Sub name"
done

# Never wait for a prompt: this runs unattended as well as by hand.
export CLOUDSDK_CORE_DISABLE_PROMPTS=1

if [[ -z "$PROJECT_ID" ]]; then
    PROJECT_ID="$(gcloud config get-value project 2>/dev/null || true)"
fi
[[ -n "$PROJECT_ID" ]] || die "no project: pass --project or set PROJECT_ID"
P=(--project="$PROJECT_ID")

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

step() {
    printf '\n==> %s\n' "$*"
}

run() {
    if ((DRY_RUN)); then
        printf '[dry-run]'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# A policy created right after its log-based metric can be refused until the metric's
# descriptor has propagated; a few seconds later it is accepted.
run_retry() {
    local attempt
    for attempt in 1 2 3 4 5; do
        if run "$@"; then
            return 0
        fi
        echo "    (retrying in $((attempt * 10))s)" >&2
        sleep $((attempt * 10))
    done
    die "gave up: $*"
}

# Writes $1 with every ${NAME} placeholder filled to $2.
render() {
    local text name
    text="$(<"$1")"
    for name in "${PLACEHOLDERS[@]}"; do
        text="${text//"\${${name}}"/"${!name}"}"
    done
    if grep -Eq '\$\{[A-Z_]+\}' <<<"$text"; then
        die "unknown placeholder in $1: $(grep -Eo '\$\{[A-Z_]+\}' <<<"$text" | head -1)"
    fi
    printf '%s\n' "$text" >"$2"
}

# The top-level displayName of a rendered policy or dashboard file: the files keep it on one
# line at the start, double-quoted (tests/test_monitoring.py holds them to that).
display_name() {
    local line
    line="$(grep -m1 '^displayName: ' "$1")" || die "no top-level displayName in $1"
    line="${line#displayName: }"
    line="${line#\"}"
    printf '%s' "${line%\"}"
}

# The resource name (first column) of the one listed line whose second column is exactly $2;
# nothing when there is none; dies when there are several.
named() {
    local listing="$1" wanted="$2" what="$3" name display rest found=""
    while IFS=$'\t' read -r name display rest; do
        if [[ -n "$name" && "$display" == "$wanted" ]]; then
            [[ -z "$found" ]] || die "several $what are named '$wanted' ($found, $name): delete all but one"
            found="$name"
        fi
    done <<<"$listing"
    printf '%s' "$found"
}

step "project $PROJECT_ID, service $SERVICE_NAME"
echo "    subscriptions: $SUBSCRIPTION, $HIGH_SUBSCRIPTION (jobs), $DLQ_SUBSCRIPTION (dead letters)"
if [[ -n "$CHANNEL_LIST" ]]; then
    echo "    notification channels: $CHANNEL_LIST"
else
    echo "    WARNING: --no-notifications: the policies notify nobody"
fi
run gcloud services enable logging.googleapis.com monitoring.googleapis.com "${P[@]}"
for subscription in "$SUBSCRIPTION" "$HIGH_SUBSCRIPTION" "$DLQ_SUBSCRIPTION"; do
    if ! gcloud pubsub subscriptions describe "$subscription" --format='value(name)' \
        "${P[@]}" >/dev/null 2>&1; then
        echo "    WARNING: subscription $subscription not found: its policies stay silent until it exists (scripts/setup_gcp.sh)"
    fi
done

step "log-based metrics"
EXISTING_METRICS="$(gcloud logging metrics list --format='value(name)' "${P[@]}")"
for file in "$MONITORING"/metrics/*.yaml; do
    metric="$(basename "$file" .yaml)"
    render "$file" "$WORK/$metric.yaml"
    if grep -Fxq "$metric" <<<"$EXISTING_METRICS"; then
        echo "    $metric exists: updating"
        run gcloud logging metrics update "$metric" --config-from-file="$WORK/$metric.yaml" "${P[@]}"
    else
        echo "    creating $metric"
        run gcloud logging metrics create "$metric" --config-from-file="$WORK/$metric.yaml" "${P[@]}"
    fi
done

step "alert policies"
EXISTING_POLICIES="$(gcloud alpha monitoring policies list \
    --format='value(name,displayName)' "${P[@]}")"
# Every file is rendered and matched first, so that two policies with one name stop the script
# before it changes any.
POLICY_FILES=()
POLICY_DISPLAY_NAMES=()
POLICY_NAMES=()
for file in "$MONITORING"/policies/*.yaml; do
    rendered="$WORK/policy-$(basename "$file")"
    render "$file" "$rendered"
    display="$(display_name "$rendered")"
    POLICY_FILES+=("$rendered")
    POLICY_DISPLAY_NAMES+=("$display")
    POLICY_NAMES+=("$(named "$EXISTING_POLICIES" "$display" "alert policies")") || exit 1
done
for i in "${!POLICY_FILES[@]}"; do
    rendered="${POLICY_FILES[$i]}"
    display="${POLICY_DISPLAY_NAMES[$i]}"
    found="${POLICY_NAMES[$i]}"
    if [[ -n "$found" ]]; then
        echo "    '$display' exists: replacing $found"
        flags=("$found" --policy-from-file="$rendered" "${P[@]}")
        if [[ -n "$CHANNEL_LIST" ]]; then
            flags+=(--set-notification-channels="$CHANNEL_LIST")
        else
            flags+=(--clear-notification-channels)
        fi
        run_retry gcloud alpha monitoring policies update "${flags[@]}"
    else
        echo "    creating '$display'"
        flags=(--policy-from-file="$rendered" "${P[@]}")
        [[ -z "$CHANNEL_LIST" ]] || flags+=(--notification-channels="$CHANNEL_LIST")
        run_retry gcloud alpha monitoring policies create "${flags[@]}"
    fi
done

step "dashboard"
EXISTING_DASHBOARDS="$(gcloud monitoring dashboards list \
    --format='value(name,displayName,etag)' "${P[@]}")"
for file in "$MONITORING"/dashboards/*.yaml; do
    rendered="$WORK/dashboard-$(basename "$file")"
    render "$file" "$rendered"
    display="$(display_name "$rendered")"
    found="$(named "$EXISTING_DASHBOARDS" "$display" "dashboards")" || exit 1
    if [[ -n "$found" ]]; then
        echo "    '$display' exists: replacing $found"
        # The etag it has now: the update replaces that version and no other.
        etag="$(awk -F'\t' -v name="$found" '$1 == name { print $3 }' <<<"$EXISTING_DASHBOARDS")"
        if [[ -n "$etag" ]]; then
            [[ "$etag" =~ ^[A-Za-z0-9]+$ ]] || die "unexpected etag '$etag' of $found"
            printf 'etag: "%s"\n' "$etag" >>"$rendered"
        fi
        run gcloud monitoring dashboards update "$found" --config-from-file="$rendered" "${P[@]}"
    else
        echo "    creating '$display'"
        run gcloud monitoring dashboards create --config-from-file="$rendered" "${P[@]}"
    fi
done

step "done"
echo "    dashboards:    https://console.cloud.google.com/monitoring/dashboards?project=$PROJECT_ID"
echo "    alerting:      https://console.cloud.google.com/monitoring/alerting?project=$PROJECT_ID"
echo "    metrics:       https://console.cloud.google.com/logs/metrics?project=$PROJECT_ID"
echo "    runbook:       docs/OPERATIONS.md"
echo "    Log-based metrics count from now on, not backwards: charts fill as runs finish."
