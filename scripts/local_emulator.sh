#!/usr/bin/env bash
# Local Pub/Sub emulator with a push subscription pointed at a locally running receiver.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/local_emulator.sh [options]

Starts the Pub/Sub emulator (cloud-pubsub-emulator, run directly, not through
`gcloud beta emulators`), waits until it answers, creates the topic and a push
subscription pointed at the local app through the emulator's REST API, and prints what
to export. In the foreground (default) Ctrl-C stops the emulator; with --detach it keeps
running and `scripts/local_emulator.sh --stop` stops it. When an emulator already answers
on the port, it is reused and only the topic and subscription are (re)configured.

Then run the app against it, e.g.:
  eval "$(scripts/local_emulator.sh --detach --print-env)"   # or copy the exports
  uvicorn app.main:app --port 8000

The emulator sends no OIDC token and no deliveryAttempt, so run the app with PUSH_AUTH=none
(the development default).

Options (environment variable in brackets; flags win over the environment):
  --host HOST           address to bind [EMULATOR_HOST; 127.0.0.1]
  --port PORT           emulator port [EMULATOR_PORT; 8085]
  --project ID          project id the emulator accepts [PUBSUB_PROJECT_ID; local-project]
  --topic NAME          jobs topic [PUBSUB_TOPIC; consensus-engine-jobs]
  --subscription NAME   push subscription [PUBSUB_SUBSCRIPTION; consensus-engine-jobs-sub]
  --high-topic NAME     high-priority topic, pushed through NAME-sub
                        [PUBSUB_HIGH_PRIORITY_TOPIC; the jobs topic + -high]
  --push-endpoint URL   where the emulator pushes
                        [PUSH_ENDPOINT; http://127.0.0.1:8000/pubsub/push]
  --ack-deadline SECS   [ACK_DEADLINE; 600] (= WORKER_ACK_DEADLINE_SECONDS)
  --emulator PATH       emulator launcher [PUBSUB_EMULATOR_BIN; cloud-pubsub-emulator on
                        PATH, else the Google Cloud SDK's platform/pubsub-emulator/bin]
  --detach              leave the emulator running in the background and exit
  --print-env           print only the export lines on stdout (for eval); logs go to stderr
  --stop                stop an emulator started with --detach on this port, and exit
  -h, --help            show this help
EOF
}

EMULATOR_HOST="${EMULATOR_HOST:-127.0.0.1}"
EMULATOR_PORT="${EMULATOR_PORT:-8085}"
PUBSUB_PROJECT_ID="${PUBSUB_PROJECT_ID:-local-project}"
PUBSUB_TOPIC="${PUBSUB_TOPIC:-consensus-engine-jobs}"
PUBSUB_SUBSCRIPTION="${PUBSUB_SUBSCRIPTION:-consensus-engine-jobs-sub}"
PUBSUB_HIGH_PRIORITY_TOPIC="${PUBSUB_HIGH_PRIORITY_TOPIC:-}"
PUSH_ENDPOINT="${PUSH_ENDPOINT:-http://127.0.0.1:8000/pubsub/push}"
ACK_DEADLINE="${ACK_DEADLINE:-600}"
PUBSUB_EMULATOR_BIN="${PUBSUB_EMULATOR_BIN:-}"
DETACH=0
PRINT_ENV=0
STOP=0

die() {
    echo "local_emulator.sh: $*" >&2
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
        --host) need_value "$@"; EMULATOR_HOST="$2"; shift 2 ;;
        --port) need_value "$@"; EMULATOR_PORT="$2"; shift 2 ;;
        --project) need_value "$@"; PUBSUB_PROJECT_ID="$2"; shift 2 ;;
        --topic) need_value "$@"; PUBSUB_TOPIC="$2"; shift 2 ;;
        --subscription) need_value "$@"; PUBSUB_SUBSCRIPTION="$2"; shift 2 ;;
        --high-topic) need_value "$@"; PUBSUB_HIGH_PRIORITY_TOPIC="$2"; shift 2 ;;
        --push-endpoint) need_value "$@"; PUSH_ENDPOINT="$2"; shift 2 ;;
        --ack-deadline) need_value "$@"; ACK_DEADLINE="$2"; shift 2 ;;
        --emulator) need_value "$@"; PUBSUB_EMULATOR_BIN="$2"; shift 2 ;;
        --detach) DETACH=1; shift ;;
        --print-env) PRINT_ENV=1; shift ;;
        --stop) STOP=1; shift ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

[[ "$EMULATOR_PORT" =~ ^[0-9]+$ ]] || die "--port must be a number"
PUBSUB_HIGH_PRIORITY_TOPIC="${PUBSUB_HIGH_PRIORITY_TOPIC:-$PUBSUB_TOPIC-high}"
[[ "$PUBSUB_HIGH_PRIORITY_TOPIC" != "$PUBSUB_TOPIC" ]] || die "--high-topic must differ from --topic"
[[ "$ACK_DEADLINE" =~ ^[0-9]+$ ]] || die "--ack-deadline must be a number of seconds"

# Keyed by port, so several emulators (e.g. parallel test runs) do not collide.
STATE_DIR="${TMPDIR:-/tmp}/consensus-engine-pubsub-emulator-${EMULATOR_PORT}"
PID_FILE="$STATE_DIR/pid"
LOG_FILE="$STATE_DIR/emulator.log"
BASE_URL="http://${EMULATOR_HOST}:${EMULATOR_PORT}"
API="$BASE_URL/v1/projects/$PUBSUB_PROJECT_ID"

# With --print-env, stdout carries only the export lines.
log() {
    echo "$*" >&2
}

answers() {
    curl --silent --fail --max-time 2 --output /dev/null "$BASE_URL/" 2>/dev/null
}

stop_emulator() {
    local pid
    [[ -f "$PID_FILE" ]] || return 0
    pid="$(<"$PID_FILE")"
    rm -f "$PID_FILE"
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 0
    log "stopping the emulator (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    # The JVM takes a few seconds to shut down; do not leave it behind.
    for _ in $(seq 1 40); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.25
    done
    log "still running after 10 s: killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

if ((STOP)); then
    if [[ -f "$PID_FILE" ]]; then
        stop_emulator
    else
        log "no emulator started by this script on port $EMULATOR_PORT"
    fi
    exit 0
fi

command -v curl >/dev/null || die "curl is required"

find_emulator() {
    local candidate
    if [[ -n "$PUBSUB_EMULATOR_BIN" ]]; then
        [[ -x "$PUBSUB_EMULATOR_BIN" ]] || die "not executable: $PUBSUB_EMULATOR_BIN"
        echo "$PUBSUB_EMULATOR_BIN"
        return
    fi
    if candidate="$(command -v cloud-pubsub-emulator)"; then
        echo "$candidate"
        return
    fi
    # Debian's google-cloud-cli-pubsub-emulator, else next to an SDK install's real gcloud.
    local sdk_bin
    sdk_bin="$(command -v gcloud 2>/dev/null || echo /nonexistent/bin/gcloud)"
    sdk_bin="$(dirname "$(readlink -f "$sdk_bin" 2>/dev/null || echo "$sdk_bin")")"
    for candidate in \
        /usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator \
        "$sdk_bin/../platform/pubsub-emulator/bin/cloud-pubsub-emulator"; do
        if [[ -x "$candidate" ]]; then
            echo "$candidate"
            return
        fi
    done
    die "cloud-pubsub-emulator not found: install google-cloud-cli-pubsub-emulator or pass --emulator"
}

STARTED=0
if answers; then
    log "an emulator already answers at $BASE_URL: reusing it"
else
    EMULATOR="$(find_emulator)"
    mkdir -p "$STATE_DIR"
    log "starting $EMULATOR on $EMULATOR_HOST:$EMULATOR_PORT (log: $LOG_FILE)"
    # The launcher (and nohup) exec java, so $! is the emulator itself. Detached, it must
    # outlive this shell's terminal; in the foreground the EXIT trap below stops it.
    if ((DETACH)); then
        nohup "$EMULATOR" --host="$EMULATOR_HOST" --port="$EMULATOR_PORT" >"$LOG_FILE" 2>&1 &
    else
        "$EMULATOR" --host="$EMULATOR_HOST" --port="$EMULATOR_PORT" >"$LOG_FILE" 2>&1 &
    fi
    echo "$!" >"$PID_FILE"
    STARTED=1
    if ((!DETACH)); then
        trap 'stop_emulator' EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM
    fi
    for _ in $(seq 1 120); do
        answers && break
        kill -0 "$(<"$PID_FILE")" 2>/dev/null || die "the emulator exited; see $LOG_FILE"
        sleep 0.25
    done
    answers || die "the emulator did not answer within 30 s; see $LOG_FILE"
fi

# PUT creates; 409 means it already exists (a reused emulator), which is fine.
put_resource() {
    local url="$1" body="$2" status
    status="$(curl --silent --show-error --max-time 10 --output "$STATE_DIR/response" \
        --write-out '%{http_code}' --request PUT --header 'Content-Type: application/json' \
        --data "$body" "$url")"
    case "$status" in
        200) echo created ;;
        409) echo exists ;;
        *) die "PUT $url answered $status: $(cat "$STATE_DIR/response")" ;;
    esac
}

send_json() {
    local method="$1" url="$2" body="$3" status
    status="$(curl --silent --show-error --max-time 10 --output "$STATE_DIR/response" \
        --write-out '%{http_code}' --request "$method" --header 'Content-Type: application/json' \
        --data "$body" "$url")"
    [[ "$status" == 200 ]] || die "$method $url answered $status: $(cat "$STATE_DIR/response")"
}

mkdir -p "$STATE_DIR"

# One topic and push subscription to the local app; called for the jobs and high-priority pair.
configure_pair() {
    local topic="$1" subscription="$2" topic_path body result
    topic_path="projects/$PUBSUB_PROJECT_ID/topics/$topic"
    log "topic $topic_path: $(put_resource "$API/topics/$topic" '{}')"
    body="$(printf '{"topic": "%s", "ackDeadlineSeconds": %d, "pushConfig": {"pushEndpoint": "%s"}}' \
        "$topic_path" "$ACK_DEADLINE" "$PUSH_ENDPOINT")"
    result="$(put_resource "$API/subscriptions/$subscription" "$body")"
    if [[ "$result" == exists ]]; then
        # Bring an existing subscription to this endpoint and deadline.
        send_json POST "$API/subscriptions/$subscription:modifyPushConfig" \
            "$(printf '{"pushConfig": {"pushEndpoint": "%s"}}' "$PUSH_ENDPOINT")"
        send_json PATCH "$API/subscriptions/$subscription" \
            "$(printf '{"subscription": {"ackDeadlineSeconds": %d}, "updateMask": "ackDeadlineSeconds"}' "$ACK_DEADLINE")"
        result=updated
    fi
    log "push subscription $subscription -> $PUSH_ENDPOINT: $result"
}

configure_pair "$PUBSUB_TOPIC" "$PUBSUB_SUBSCRIPTION"
configure_pair "$PUBSUB_HIGH_PRIORITY_TOPIC" "$PUBSUB_HIGH_PRIORITY_TOPIC-sub"

EXPORTS="export PUBSUB_EMULATOR_HOST=${EMULATOR_HOST}:${EMULATOR_PORT}
export PUBSUB_PROJECT_ID=${PUBSUB_PROJECT_ID}
export PUBSUB_TOPIC=${PUBSUB_TOPIC}
export PUBSUB_HIGH_PRIORITY_TOPIC=${PUBSUB_HIGH_PRIORITY_TOPIC}"
if ((PRINT_ENV)); then
    echo "$EXPORTS"
else
    log ""
    log "Export these in the shell that runs the app:"
    echo "$EXPORTS"
    log ""
    log "Publish a test job:"
    log "  DATA=\$(printf '%s' '{\"idea\": \"A shared grocery list app\"}' | base64 | tr -d '\\n')"
    log "  curl -s -X POST $API/topics/$PUBSUB_TOPIC:publish -H 'Content-Type: application/json' \\"
    log "    -d '{\"messages\": [{\"data\": \"'\"\$DATA\"'\"}]}'"
fi

if ((DETACH)); then
    if ((STARTED)); then
        log "emulator left running (pid $(<"$PID_FILE")); stop it with: $0 --port $EMULATOR_PORT --stop"
    fi
    exit 0
fi

if ((STARTED)); then
    log "emulator running; Ctrl-C stops it"
    wait "$(<"$PID_FILE")" || true
    die "the emulator exited; see $LOG_FILE"
fi
