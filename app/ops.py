"""Operator view: `python -m app.ops quarantine` and `python -m app.ops runs`.

Reads the database the settings point at (the same environment as the service), so it works
from a laptop with DATABASE_URL or inside the container with the Cloud SQL settings.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import datetime

from app.settings import get_settings
from app.store.db import build_engine, new_cloud_sql_connector
from app.store.runs import RunStore, utcnow
from app.store.tables import QuarantinedMessage, Run


def format_quarantine(rows: Sequence[QuarantinedMessage], show_body: bool) -> list[str]:
    """One block per quarantined push request, newest first."""
    lines = [f"{len(rows)} quarantined message(s)"]
    for row in rows:
        lines.append(
            f"#{row.id} {row.received_at:%Y-%m-%d %H:%M:%S}Z message_id={row.message_id} "
            f"subscription={row.subscription}"
        )
        lines.append(f"    reason: {row.reason}")
        body = row.raw_body if show_body else row.raw_body[:200]
        suffix = "" if show_body or len(row.raw_body) <= 200 else f" ... ({len(row.raw_body)} B)"
        lines.append(f"    body: {body!r}{suffix}")
    return lines


def format_runs(runs: Sequence[Run], now: datetime) -> list[str]:
    """Failed runs and unfinished runs that no live lease is working on."""
    lines = [f"{len(runs)} run(s) needing attention"]
    for run in runs:
        if run.status == "failed":
            state = "failed"
        elif run.lease_owner is not None and run.lease_expires_at is not None:
            ago = (now - run.lease_expires_at).total_seconds()
            state = f"lease of {run.lease_owner} expired {ago:.0f}s ago (owner died?)"
        elif run.started_at is None:
            state = f"queued for {(now - run.queued_at).total_seconds():.0f}s, never started"
        else:
            state = "released, waiting for redelivery"
        failed_steps = [s.step_name for s in run.steps if s.status == "failed"]
        lines.append(
            f"{run.id} {run.status} deliveries={run.delivery_count} "
            f"updated={run.updated_at:%Y-%m-%d %H:%M:%S}Z"
        )
        lines.append(f"    state: {state}")
        if failed_steps:
            lines.append(f"    failed steps: {', '.join(failed_steps)}")
        if run.error_message:
            lines.append(f"    error: {run.error_message}")
    return lines


async def report(store: RunStore, what: str, limit: int, show_body: bool) -> list[str]:
    if what == "quarantine":
        return format_quarantine(await store.list_quarantined(limit, 0), show_body)
    return format_runs(await store.list_attention(limit), utcnow())


async def _main(what: str, limit: int, show_body: bool) -> None:
    settings = get_settings()
    connector = new_cloud_sql_connector() if settings.use_cloud_sql_connector else None
    engine = build_engine(settings, connector)
    try:
        print("\n".join(await report(RunStore(engine), what, limit, show_body)))
    finally:
        await engine.dispose()
        if connector is not None:
            await connector.close_async()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.ops", description=__doc__)
    parser.add_argument("what", choices=["quarantine", "runs"])
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--show-body", action="store_true", help="print whole request bodies")
    args = parser.parse_args(argv)
    asyncio.run(_main(args.what, args.limit, args.show_body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
