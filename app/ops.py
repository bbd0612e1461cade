"""Operator view: `python -m app.ops quarantine`, `python -m app.ops runs` and
`python -m app.ops dead-letters [--replay RUN_ID | --replay-all]`.

Reads the database the settings point at (the same environment as the service), so it works
from a laptop with DATABASE_URL or inside the container with the Cloud SQL settings.

`dead-letters` lists what waits on the pull subscription that keeps dead letters
(PUBSUB_DLQ_SUBSCRIPTION in PUBSUB_PROJECT_ID; PUBSUB_EMULATOR_HOST honoured) without
acknowledging it, each message with its run's status and last error, then what the dead-letter
receiver did (the `dead_letters` table). `--replay RUN_ID` replays the dead letters of one run,
`--replay-all` every dead letter that names a run: a run failed by time (the job timeout, or
dead-lettered past it) or left unfinished is reset and its job published again to the jobs
topic (the high-priority topic for a high run); a completed run, one failed by its content and
one a delivery is working on are not run again; the dead letter is acknowledged. Replaying is
idempotent: a dead letter is replayed at most once (recorded in `dead_letters`), however often
the command runs. Exit status 1 when a replay could not publish or RUN_ID has no dead letter.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.dead_letter import SOURCE_DELIVERY_COUNT, SOURCE_PROJECT, SOURCE_SUBSCRIPTION
from app.logs import configure_logging
from app.publish import Outbox, PubSubPublisher
from app.push.envelope import MalformedPush, PushMessage, parse_job
from app.settings import Settings, get_settings
from app.store.db import build_engine, new_cloud_sql_connector
from app.store.recovery import DeadLetterRef, RecoveryStore, ReplayOutcome, RunState
from app.store.runs import RunStore, utcnow
from app.store.tables import DeadLetter, QuarantinedMessage, Run
from app.sweep import queued

# Messages pulled per request, and at most per command (each is held until acked or released).
PULL_BATCH = 100
MAX_PULLED = 1000
# How long a pull waits for messages; an empty answer ends the listing.
PULL_TIMEOUT_SECONDS = 5.0
# The command holds what it pulled this long (the subscription's own ack deadline may be 10 s).
HOLD_SECONDS = 300
# How long each call retries while Pub/Sub is unavailable before the command gives up.
RPC_RETRY_SECONDS = 10.0


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


# --- dead letters ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pulled:
    """A message on the dead-letter subscription, held by this command until acknowledged or
    released."""

    ack_id: str
    message_id: str
    data: bytes
    attributes: dict[str, str]
    publish_time: datetime | None


class DeadLetterSubscription:
    """The pull subscription that keeps dead letters, through google-cloud-pubsub.

    What `pull` returns stays leased to this command (for `HOLD_SECONDS`) so a later pull does
    not return it again; `release` hands it back untouched, `ack` removes it.
    """

    def __init__(self, project_id: str, subscription: str, emulator_host: str | None) -> None:
        if emulator_host and not os.environ.get("PUBSUB_EMULATOR_HOST"):
            # The client library reads the emulator address (and insecure channel) only here.
            os.environ["PUBSUB_EMULATOR_HOST"] = emulator_host
        from google.api_core.retry import Retry, if_transient_error
        from google.cloud.pubsub_v1 import SubscriberClient

        self._client: Any = SubscriberClient()
        self._retry = Retry(predicate=if_transient_error, timeout=RPC_RETRY_SECONDS)
        self.path = (
            subscription
            if subscription.startswith("projects/")
            else self._client.subscription_path(project_id, subscription)
        )

    async def pull(self, most: int) -> list[Pulled]:
        """Up to `most` messages, each once (a redelivery to this command replaces its copy)."""
        held: dict[str, Pulled] = {}
        while len(held) < most:
            batch = await asyncio.to_thread(self._pull, min(PULL_BATCH, most - len(held)))
            if not batch:
                break
            await self._modify([m.ack_id for m in batch], HOLD_SECONDS)
            new = sum(m.message_id not in held for m in batch)
            held.update((m.message_id, m) for m in batch)
            if not new:
                break
        return list(held.values())

    def _pull(self, most: int) -> list[Pulled]:
        from google.api_core.exceptions import DeadlineExceeded

        try:
            response = self._client.pull(
                request={"subscription": self.path, "max_messages": most},
                timeout=PULL_TIMEOUT_SECONDS,
                retry=self._retry,
            )
        except DeadlineExceeded:
            return []  # nothing arrived while the pull waited
        return [
            Pulled(
                r.ack_id,
                r.message.message_id,
                bytes(r.message.data),
                dict(r.message.attributes),
                r.message.publish_time,
            )
            for r in response.received_messages
        ]

    async def ack(self, ack_ids: Sequence[str]) -> None:
        if ack_ids:
            request = {"subscription": self.path, "ack_ids": list(ack_ids)}
            await asyncio.to_thread(self._client.acknowledge, request=request, retry=self._retry)

    async def release(self, ack_ids: Sequence[str]) -> None:
        await self._modify(ack_ids, 0)

    async def _modify(self, ack_ids: Sequence[str], seconds: int) -> None:
        if ack_ids:
            request = {
                "subscription": self.path,
                "ack_ids": list(ack_ids),
                "ack_deadline_seconds": seconds,
            }
            await asyncio.to_thread(
                self._client.modify_ack_deadline, request=request, retry=self._retry
            )

    def close(self) -> None:
        self._client.close()


@dataclass(frozen=True)
class DeadLetterView:
    """A pulled dead letter and what the database says about its run."""

    message: Pulled
    attempts: int | None
    source_subscription: str | None
    run_id: str | None
    state: RunState | None
    note: str | None  # why there is no run to show


def _source_subscription(attributes: dict[str, str]) -> str | None:
    subscription = attributes.get(SOURCE_SUBSCRIPTION)
    project = attributes.get(SOURCE_PROJECT)
    if subscription and project and not subscription.startswith("projects/"):
        return f"projects/{project}/subscriptions/{subscription}"
    return subscription


def _attempts(attributes: dict[str, str]) -> int | None:
    raw = attributes.get(SOURCE_DELIVERY_COUNT, "")
    return int(raw) if raw.isdigit() and len(raw) < 10 else None


async def _run_of_idea(
    message: Pulled, store: RunStore, recovery: RecoveryStore, source: str | None
) -> str | None:
    """The run of a self-contained job: the one the receiver recorded for this dead letter,
    else the one its original deliveries created (app/dead_letter.py maps it the same way)."""
    recorded = await recovery.run_of_dead_letter(message.message_id)
    if recorded is not None:
        return recorded
    keys = [f"{source}/{message.message_id}"] if source else []
    short = message.attributes.get(SOURCE_SUBSCRIPTION)
    if short and short != source:
        keys.append(f"{short}/{message.message_id}")
    for key in keys:
        run = await store.run_by_source(key)
        if run is not None:
            return run.id
    return None


async def describe(
    message: Pulled, subscription: str, store: RunStore, recovery: RecoveryStore
) -> DeadLetterView:
    source = _source_subscription(message.attributes)
    attempts = _attempts(message.attributes)
    try:
        job = parse_job(
            PushMessage(message.data, message.message_id, subscription, message.attributes)
        )
    except MalformedPush as exc:
        return DeadLetterView(message, attempts, source, None, None, f"not a job: {exc}")
    run_id = job.run_id or await _run_of_idea(message, store, recovery, source)
    if run_id is None:
        no_run = "a self-contained job with no run yet (the dead-letter receiver has not seen it)"
        return DeadLetterView(message, attempts, source, None, None, no_run)
    state = await recovery.run_state(run_id)
    missing = None if state is not None else f"run {run_id} is not in the database"
    return DeadLetterView(message, attempts, source, run_id, state, missing)


def format_dead_letters(
    subscription: str,
    views: Sequence[DeadLetterView],
    recorded: Sequence[DeadLetter],
    limit: int,
) -> list[str]:
    more = " (the first --limit; more may wait)" if len(views) >= limit else ""
    lines = [f"{len(views)} dead letter(s) waiting on {subscription}{more}"]
    for view in views:
        published = view.message.publish_time
        when = f" published={published:%Y-%m-%d %H:%M:%S}Z" if published else ""
        lines.append(
            f"message_id={view.message.message_id} attempts={view.attempts or '?'} "
            f"source={view.source_subscription or '?'}{when}"
        )
        if view.state is not None:
            leased = ", a delivery holds its lease" if view.state.leased else ""
            lines.append(f"    run {view.run_id} {view.state.status}{leased}")
            if view.state.error_message:
                lines.append(f"    last error: {view.state.error_message}")
        if view.note:
            lines.append(f"    {view.note}")
    lines.append(f"{len(recorded)} dead letter(s) recorded in the database, newest first")
    for row in recorded:
        lines.append(
            f"#{row.id} {row.received_at:%Y-%m-%d %H:%M:%S}Z run={row.run_id} "
            f"message_id={row.message_id} attempts={row.delivery_attempts} "
            f"source={row.source_subscription}"
        )
        lines.append(f"    {row.action}: {row.reason}")
    return lines


async def dead_letters_report(
    subscription: DeadLetterSubscription, store: RunStore, recovery: RecoveryStore, limit: int
) -> list[str]:
    """The listing; every pulled message is released untouched."""
    pulled = await subscription.pull(limit)
    try:
        views = [await describe(m, subscription.path, store, recovery) for m in pulled]
    finally:
        await subscription.release([m.ack_id for m in pulled])
    recorded = await recovery.list_dead_letters(limit)
    return format_dead_letters(subscription.path, views, recorded, limit)


async def replay_dead_letters(
    subscription: DeadLetterSubscription,
    store: RunStore,
    recovery: RecoveryStore,
    outbox: Outbox,
    run_id: str | None,
) -> tuple[list[str], bool]:
    """Replay the dead letters of `run_id` (None: of every run); (report, all went well).

    Per run: decide and reset in one transaction (`RecoveryStore.replay`, which also makes it
    once per dead letter), publish the run's job once when it was reset, then acknowledge its
    dead letters. When the publish fails they stay; the run waits in the outbox, which the
    sweep publishes (`POST /tasks/sweep`), and the next replay only acknowledges them.
    """
    pulled = await subscription.pull(MAX_PULLED)
    by_run: dict[str, list[DeadLetterView]] = {}
    handled: list[str] = []  # ack ids, filled as each run is dealt with
    try:
        for message in pulled:
            view = await describe(message, subscription.path, store, recovery)
            if view.run_id is not None and run_id in (None, view.run_id):
                by_run.setdefault(view.run_id, []).append(view)
        lines, ok = await _replay_runs(by_run, recovery, outbox, handled)
    finally:
        await subscription.ack(handled)
        acked = set(handled)
        await subscription.release([m.ack_id for m in pulled if m.ack_id not in acked])
    if run_id is not None and not by_run:
        ok = False
        lines.append(f"no dead letter of run {run_id} waits on {subscription.path}")
    count = sum(len(views) for views in by_run.values())
    lines.insert(0, f"{len(pulled)} dead letter(s) on {subscription.path}, {count} to replay")
    if len(pulled) >= MAX_PULLED:
        lines.append(f"stopped after {MAX_PULLED} dead letters: run again for the rest")
    return lines, ok


async def _replay_runs(
    by_run: dict[str, list[DeadLetterView]],
    recovery: RecoveryStore,
    outbox: Outbox,
    handled: list[str],
) -> tuple[list[str], bool]:
    """(report, all went well); the ack ids of the dead letters dealt with go to `handled`."""
    lines: list[str] = []
    ok = True
    for run_id, views in by_run.items():
        refs = [
            DeadLetterRef(v.message.message_id, v.source_subscription, v.attempts) for v in views
        ]
        label = f"run {run_id} (message_id {', '.join(r.message_id for r in refs)})"
        replay = await recovery.replay(run_id, refs)
        if replay.outcome is ReplayOutcome.NOT_FOUND:
            lines.append(f"{label}: left on the subscription, {replay.reason}")
            continue
        if replay.outcome is ReplayOutcome.REPLAYED:
            assert replay.job is not None
            if not await outbox.publish(queued(replay.job)):
                ok = False
                lines.append(
                    f"{label}: reset, but the publish failed; the dead letters stay and the "
                    "sweep publishes the run from the outbox"
                )
                continue
            priority = replay.job.priority
            lines.append(f"{label}: replayed as a {priority}-priority job, {replay.reason}")
        else:
            lines.append(f"{label}: acknowledged without a new job, {replay.reason}")
        handled.extend(v.message.ack_id for v in views)
    return lines, ok


def dead_letter_subscription(settings: Settings) -> DeadLetterSubscription:
    if not settings.pubsub_project_id:
        raise SystemExit("dead letters live in Pub/Sub: set PUBSUB_PROJECT_ID")
    return DeadLetterSubscription(
        settings.pubsub_project_id, settings.pubsub_dlq_subscription, settings.pubsub_emulator_host
    )


def publisher(settings: Settings) -> PubSubPublisher:
    assert settings.pubsub_project_id is not None
    return PubSubPublisher(
        settings.pubsub_project_id,
        settings.pubsub_topic,
        settings.effective_pubsub_high_priority_topic,
        settings.pubsub_emulator_host,
    )


async def _dead_letters(
    settings: Settings, store: RunStore, recovery: RecoveryStore, args: argparse.Namespace
) -> bool:
    from google.api_core.exceptions import GoogleAPIError

    subscription = dead_letter_subscription(settings)
    try:
        return await _dead_letters_on(subscription, settings, store, recovery, args)
    except GoogleAPIError as exc:
        print(f"Pub/Sub refused or did not answer ({subscription.path}): {exc}", file=sys.stderr)
        return False
    finally:
        subscription.close()


async def _dead_letters_on(
    subscription: DeadLetterSubscription,
    settings: Settings,
    store: RunStore,
    recovery: RecoveryStore,
    args: argparse.Namespace,
) -> bool:
    if not (args.replay or args.replay_all):
        print("\n".join(await dead_letters_report(subscription, store, recovery, args.limit)))
        return True
    jobs = publisher(settings)
    try:
        lines, ok = await replay_dead_letters(
            subscription, store, recovery, Outbox(recovery, jobs), args.replay
        )
    finally:
        await jobs.aclose()
    print("\n".join(lines))
    return ok


async def _main(args: argparse.Namespace) -> bool:
    settings = get_settings()
    configure_logging(False, settings.log_level, settings.pubsub_project_id)
    connector = new_cloud_sql_connector() if settings.use_cloud_sql_connector else None
    engine = build_engine(settings, connector)
    try:
        store = RunStore(engine)
        if args.what == "dead-letters":
            return await _dead_letters(settings, store, RecoveryStore(engine), args)
        print("\n".join(await report(store, args.what, args.limit, args.show_body)))
        return True
    finally:
        await engine.dispose()
        if connector is not None:
            await connector.close_async()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.ops",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("what", choices=["quarantine", "runs", "dead-letters"])
    parser.add_argument("--limit", type=int, default=50, help="rows (and dead letters) listed")
    parser.add_argument("--show-body", action="store_true", help="print whole request bodies")
    replay = parser.add_mutually_exclusive_group()
    replay.add_argument(
        "--replay", metavar="RUN_ID", help="dead-letters: replay the dead letters of this run"
    )
    replay.add_argument(
        "--replay-all", action="store_true", help="dead-letters: replay every dead letter"
    )
    args = parser.parse_args(argv)
    if (args.replay or args.replay_all) and args.what != "dead-letters":
        parser.error("--replay and --replay-all go with dead-letters")
    return 0 if asyncio.run(_main(args)) else 1


if __name__ == "__main__":
    sys.exit(main())
