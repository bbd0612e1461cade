#!/usr/bin/env python3
"""Build a Pub/Sub push envelope for a job and POST it to the push endpoint (or print curl).

Examples:
  python scripts/send_envelope.py --idea "A shared grocery list app for households."
  python scripts/send_envelope.py --run-id 3f1c... --url http://127.0.0.1:8000/pubsub/push
  python scripts/send_envelope.py --idea "..." --print-curl
"""

from __future__ import annotations

import argparse
import base64
import json
import shlex
import sys
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000/pubsub/push"
DEFAULT_SUBSCRIPTION = "projects/local-project/subscriptions/consensus-engine-jobs-sub"


def build_envelope(
    job: dict[str, Any], message_id: str, subscription: str, attempt: int | None
) -> dict[str, Any]:
    """A wrapped push envelope exactly as Pub/Sub sends it."""
    envelope: dict[str, Any] = {
        "message": {
            "data": base64.b64encode(json.dumps(job).encode()).decode(),
            "attributes": {},
            "messageId": message_id,
            "publishTime": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        },
        "subscription": subscription,
    }
    if attempt is not None:
        envelope["deliveryAttempt"] = attempt
    return envelope


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    job = parser.add_mutually_exclusive_group(required=True)
    job.add_argument("--idea", help="a self-contained job: the idea to review")
    job.add_argument("--run-id", help="a run created by POST /v1/full-review")
    parser.add_argument("--extra-context", help="extra context (a string, or JSON for an object)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"push endpoint (default {DEFAULT_URL})")
    parser.add_argument("--message-id", default=None, help="messageId (default: random)")
    parser.add_argument("--subscription", default=DEFAULT_SUBSCRIPTION)
    parser.add_argument("--delivery-attempt", type=int, default=None)
    parser.add_argument("--token", default=None, help="an OIDC token sent as Bearer")
    parser.add_argument("--print-curl", action="store_true", help="print curl instead of sending")
    args = parser.parse_args(argv)

    payload: dict[str, Any] = {"run_id": args.run_id} if args.run_id else {"idea": args.idea}
    if args.extra_context is not None:
        try:
            payload["extra_context"] = json.loads(args.extra_context)
        except json.JSONDecodeError:
            payload["extra_context"] = args.extra_context
    body = json.dumps(
        build_envelope(
            payload,
            args.message_id or uuid.uuid4().hex,
            args.subscription,
            args.delivery_attempt,
        )
    )
    headers = {"content-type": "application/json"}
    if args.token:
        headers["authorization"] = f"Bearer {args.token}"

    if args.print_curl:
        parts = ["curl", "-sS", "-i", "-X", "POST", args.url]
        for key, value in headers.items():
            parts += ["-H", f"{key}: {value}"]
        parts += ["--data", body]
        print(shlex.join(parts))
        return 0

    request = urllib.request.Request(args.url, data=body.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=700) as response:
            print(f"{response.status} {response.reason}")
            print(response.read().decode(errors="replace"))
            return 0
    except urllib.error.HTTPError as error:
        print(f"{error.code} {error.reason}")
        print(error.read().decode(errors="replace"))
        return 1
    except urllib.error.URLError as error:
        print(f"could not reach {args.url}: {error.reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
