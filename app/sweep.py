"""The sweep: no run is ever stranded.

One round (`Sweeper.sweep_once`) does three things, each a conditional update on the database's
clock, so instances may sweep at the same time:

1. fails unfinished runs nobody holds whose job timeout (`WORKER_JOB_TIMEOUT_SECONDS`) passed;
2. re-enqueues unfinished runs that hold no live lease and made no progress for
   `RUN_STALE_SECONDS` (their last delivery was refused, dead-lettered or lost with its
   instance); a run deferred by the daily budget (`DAILY_BUDGET_USD`, app/cost.py) waits until
   the budget's next UTC day has begun, and its job timeout counts from then;
3. publishes runs the queue never accepted (the outbox).

On Cloud Run the round is triggered only by Cloud Scheduler through `POST /tasks/sweep`, because
a request-based instance gets CPU only inside requests (and none exists when scaled to zero):
the manifest sets `SWEEP_INTERVAL_SECONDS=0`, which turns the in-process timer off. The timer
(every 60 s by default) serves the embedded default, where no scheduler exists.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from loguru import logger

from app.publish import PUBLISH_TIMEOUT_SECONDS, Outbox, QueuedJob
from app.service import run_end_fields
from app.store.recovery import RecoveryStore, RunJob
from app.store.runs import RunStore

# Runs handled per round and per kind; the next round takes the rest.
BATCH = 100
# A new run's own publish gets this long before the sweep publishes it too.
OUTBOX_GRACE_SECONDS = 2 * PUBLISH_TIMEOUT_SECONDS


def queued(run: RunJob) -> QueuedJob:
    """The job message that hands `run` to the queue again, routed by its priority."""
    return QueuedJob(run.run_id, run.run_type, run.priority)


@dataclass(frozen=True)
class SweepReport:
    timed_out: int
    requeued: int
    published: int


class Sweeper:
    def __init__(
        self,
        recovery: RecoveryStore,
        outbox: Outbox,
        stale_seconds: float,
        job_timeout_seconds: float,
        *,
        runs: RunStore,
    ) -> None:
        self._recovery = recovery
        self._runs = runs
        self._outbox = outbox
        self._stale_seconds = stale_seconds
        self._job_timeout_seconds = job_timeout_seconds

    async def sweep_once(self) -> SweepReport:
        """One round; raises `StoreUnavailable` when the database does not answer."""
        timed_out = 0
        reason = f"job timeout of {self._job_timeout_seconds:g}s exceeded"
        for run_id in await self._recovery.timed_out_runs(self._job_timeout_seconds, BATCH):
            if await self._recovery.fail_unleased(run_id, reason):
                timed_out += 1
                logger.error(
                    "job failed: {}",
                    reason,
                    run_id=run_id,
                    lifecycle_event="job_failed",
                    error_message=reason,
                    delivery_attempt=None,
                    message_id=None,
                    **await run_end_fields(self._runs, run_id),
                )

        requeued = 0
        for run in await self._recovery.take_stale(self._stale_seconds, BATCH):
            if not await self._outbox.publish(queued(run)):
                break  # the queue is unreachable; these runs are taken again next time
            requeued += 1
            logger.warning(
                "stale run re-enqueued (no live lease, no progress for {:g}s)",
                self._stale_seconds,
                run_id=run.run_id,
                lifecycle_event="run_requeued",
            )

        published = 0
        for run in await self._recovery.unpublished_runs(OUTBOX_GRACE_SECONDS, BATCH):
            if not await self._outbox.publish(queued(run)):
                break
            published += 1
        if timed_out or requeued or published:
            logger.info(
                "sweep: {} timed out, {} re-enqueued, {} published",
                timed_out,
                requeued,
                published,
            )
        return SweepReport(timed_out, requeued, published)

    async def run_forever(self, interval: float) -> None:
        """The in-process timer: a round every `interval` seconds, errors logged, never fatal."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep_once()
            except Exception as exc:
                logger.opt(exception=exc).warning(
                    "sweep round failed; next round in {:g}s", interval
                )
