"""Queries of the recovery paths: the outbox, runs nobody is working on, dead letters.

Every decision is one conditional UPDATE judged on the database's clock, so two instances
sweeping at once never hand the same run to the queue twice in one round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import bindparam, func, select, update

from app.domain.models import Priority, RunType
from app.store.base import Repository, db_time
from app.store.runs import UNFINISHED, RunStatus, StepStatus, fail_run, no_live_lease, utcnow
from app.store.tables import DeadLetter, Run, StepProgress

# How the recovery paths word the failures they cause: the job timeout (app/service.py,
# app/sweep.py) and a dead letter past it (app/dead_letter.py). Such a run ran out of time;
# nothing in its content failed it, so an operator's replay may run it again.
REPLAYABLE_FAILURES = ("job timeout of ", "dead-lettered after ")
# How the `dead_letters` rows of operators' replays begin (the receiver's never do).
_REPLAY_REASON = "operator replay: "


@dataclass(frozen=True)
class RunJob:
    """What a job message says about a run: which one, and how the queue routes it."""

    run_id: str
    run_type: RunType
    priority: Priority


@dataclass(frozen=True)
class RunState:
    """What the dead-letter receiver needs to decide about a run (and to re-enqueue it)."""

    status: str
    leased: bool
    elapsed_seconds: float  # since the first claim, or since it was queued if never claimed
    error_message: str | None
    job: RunJob


class ReplayOutcome(StrEnum):
    """What an operator's replay of a dead letter did; the first three are recorded as the
    `action` of a `dead_letters` row (beside the receiver's requeued | failed | finished |
    in_progress)."""

    REPLAYED = "replayed"  # the run was reset: the caller publishes its job
    FINISHED = "finished"  # completed, or failed by its content: not run again
    IN_PROGRESS = "in_progress"  # a delivery holds the run's live lease
    ALREADY_REPLAYED = "already_replayed"  # this dead letter was replayed before: nothing done
    NOT_FOUND = "not_found"


@dataclass(frozen=True)
class DeadLetterRef:
    """A dead letter as an operator's replay names it."""

    message_id: str
    source_subscription: str | None
    delivery_attempts: int | None


@dataclass(frozen=True)
class Replay:
    outcome: ReplayOutcome
    reason: str
    job: RunJob | None = None


_JOB_COLUMNS = (Run.id, Run.run_type, Run.priority)


def _live_lease() -> Any:
    return Run.lease_owner.is_not(None) & (Run.lease_expires_at >= db_time())


def _job(run_id: str, run_type: str, priority: str) -> RunJob:
    # The columns hold what the store wrote; anything else reads as the default.
    return RunJob(
        run_id,
        "revision" if run_type == "revision" else "initial",
        "high" if priority == "high" else "normal",
    )


class RecoveryStore(Repository):
    """The outbox, the stale-run sweep and the dead-letter record."""

    async def mark_published(self, run_id: str) -> None:
        async with self._transaction() as session:
            await session.execute(
                update(Run)
                .where(Run.id == run_id, Run.published_at.is_(None))
                .values(published_at=db_time())
                .execution_options(synchronize_session=False)
            )

    async def unpublished_runs(self, older_than_seconds: float, limit: int) -> list[RunJob]:
        """Queued runs whose job message the queue never accepted, oldest first."""
        async with self._transaction() as session:
            result = await session.execute(
                select(*_JOB_COLUMNS)
                .where(
                    Run.status == RunStatus.QUEUED,
                    Run.published_at.is_(None),
                    Run.created_at < db_time(-older_than_seconds),
                )
                .order_by(Run.created_at)
                .limit(limit)
            )
            return [_job(*row) for row in result]

    async def unfinished_runs(self, limit: int) -> list[RunJob]:
        """Runs not yet completed or failed, oldest first."""
        async with self._transaction() as session:
            result = await session.execute(
                select(*_JOB_COLUMNS)
                .where(Run.status.in_(UNFINISHED))
                .order_by(Run.created_at)
                .limit(limit)
            )
            return [_job(*row) for row in result]

    async def take_stale(self, stale_seconds: float, limit: int) -> list[RunJob]:
        """Runs that were published, are unfinished, hold no live lease and made no progress
        for `stale_seconds`; each is marked re-enqueued (which counts as progress, so another
        sweep leaves it alone for the next `stale_seconds`). A run deferred by the daily
        budget waits until its `deferred_until` has passed."""
        async with self._transaction() as session:
            candidates = (
                select(Run.id)
                .where(
                    Run.status.in_(UNFINISHED),
                    Run.published_at.is_not(None),
                    no_live_lease(),
                    Run.updated_at < db_time(-stale_seconds),
                    Run.deferred_until.is_(None) | (Run.deferred_until <= db_time()),
                )
                .order_by(Run.updated_at)
                .limit(limit)
            )
            ids = list((await session.execute(candidates)).scalars().all())
            if not ids:
                return []
            result = await session.execute(
                update(Run)
                .where(
                    Run.id.in_(ids),
                    Run.status.in_(UNFINISHED),
                    no_live_lease(),
                    Run.updated_at < db_time(-stale_seconds),
                )
                .values(requeue_count=Run.requeue_count + 1, updated_at=db_time())
                .returning(*_JOB_COLUMNS)
                .execution_options(synchronize_session=False)
            )
            return [_job(*row) for row in result]

    async def timed_out_runs(self, job_timeout_seconds: float, limit: int) -> list[str]:
        """Unfinished runs without a live lease whose job timeout has passed: counted from the
        first claim, or for runs never claimed from the moment they were queued (deferred by
        the daily budget: from the end of their deferral, so waiting for it never fails them)."""
        async with self._transaction() as session:
            since = func.coalesce(Run.started_at, Run.deferred_until, Run.queued_at)
            result = await session.execute(
                select(Run.id)
                .where(
                    Run.status.in_(UNFINISHED),
                    no_live_lease(),
                    since < db_time(-job_timeout_seconds),
                )
                .order_by(Run.queued_at)
                .limit(limit)
            )
            return list(result.scalars().all())

    async def fail_unleased(self, run_id: str, reason: str) -> bool:
        """Fail an unfinished run nobody holds; the reason keeps the run's last error.
        False when the run finished or was claimed meanwhile."""
        async with self._progress() as (connection, events):
            last_error = await connection.scalar(select(Run.error_message).where(Run.id == run_id))
            error = f"{reason}; last error: {last_error}" if last_error else reason
            unleased = (Run.status.in_(UNFINISHED), no_live_lease())
            return await fail_run(connection, events, run_id, error, *unleased)

    async def run_state(self, run_id: str) -> RunState | None:
        async with self._transaction() as session:
            row = (
                await session.execute(
                    select(
                        Run.status,
                        _live_lease(),
                        func.coalesce(Run.started_at, Run.queued_at),
                        db_time(),
                        Run.error_message,
                        *_JOB_COLUMNS,
                    ).where(Run.id == run_id)
                )
            ).one_or_none()
        if row is None:
            return None
        status, leased, since, now, error, *job = row
        return RunState(status, bool(leased), (now - since).total_seconds(), error, _job(*job))

    async def mark_requeued(self, run_id: str) -> None:
        async with self._transaction() as session:
            await session.execute(
                update(Run)
                .where(Run.id == run_id)
                .values(requeue_count=Run.requeue_count + 1, updated_at=db_time())
                .execution_options(synchronize_session=False)
            )

    async def record_dead_letter(
        self,
        run_id: str | None,
        message_id: str | None,
        source_subscription: str | None,
        delivery_attempts: int | None,
        action: str,
        reason: str,
    ) -> int:
        return await self._insert(
            _dead_letter(run_id, message_id, source_subscription, delivery_attempts, action, reason)
        )

    async def list_dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        """What the receiver and replays did with dead letters, newest first."""
        async with self._transaction() as session:
            result = await session.execute(
                select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit)
            )
            return result.scalars().all()

    async def run_of_dead_letter(self, message_id: str) -> str | None:
        """The run a recorded dead letter (by its message id) was mapped to, if any."""
        async with self._transaction() as session:
            return await session.scalar(
                select(DeadLetter.run_id)
                .where(DeadLetter.message_id == message_id, DeadLetter.run_id.is_not(None))
                .order_by(DeadLetter.id.desc())
                .limit(1)
            )

    async def replay(self, run_id: str, dead_letters: Sequence[DeadLetterRef]) -> Replay:
        """Make the run of these dead letters runnable again, once per dead letter (its message
        id): the decision, the reset and a `dead_letters` row per dead letter commit together.

        A run failed by time (`REPLAYABLE_FAILURES`), or unfinished with no live lease, goes
        back to queued: error cleared; job timeout restarted (`started_at` cleared, `queued_at`
        now, as both the claim and the sweep count from them); failed and interrupted steps
        pending again while completed ones stay, so no finished LLM call is repeated; and
        unpublished, so the outbox relay publishes it should the caller not. A completed run,
        one failed by its content (a replay would fail the same way) and one a delivery holds
        are left as they are. Dead letters replayed before are left out; when none is left,
        nothing changes (`ALREADY_REPLAYED`).
        """
        async with self._transaction() as session:
            row = (
                await session.execute(
                    select(Run.status, Run.error_message, _live_lease(), *_JOB_COLUMNS)
                    .where(Run.id == run_id)
                    .with_for_update()
                )
            ).one_or_none()
            if row is None:
                return Replay(ReplayOutcome.NOT_FOUND, f"no run {run_id}")
            status, error, leased, *job = row
            run_job = _job(*job)
            # The run's row lock orders concurrent replays: the later one sees these rows.
            result = await session.execute(
                select(DeadLetter.message_id, DeadLetter.action).where(
                    DeadLetter.run_id == run_id,
                    DeadLetter.message_id.in_([d.message_id for d in dead_letters]),
                    DeadLetter.reason.startswith(_REPLAY_REASON, autoescape=True),
                )
            )
            recorded = {(message_id, action) for message_id, action in result}
            replayed = {m for m, action in recorded if action == ReplayOutcome.REPLAYED}
            fresh = [d for d in dead_letters if d.message_id not in replayed]
            if not fresh:
                return Replay(ReplayOutcome.ALREADY_REPLAYED, "replayed before", run_job)
            if status == RunStatus.COMPLETED:
                outcome, reason = ReplayOutcome.FINISHED, "run already completed"
            elif status == RunStatus.FAILED and not (error or "").startswith(REPLAYABLE_FAILURES):
                outcome, reason = ReplayOutcome.FINISHED, f"run failed by its content: {error}"
            elif leased:
                outcome, reason = ReplayOutcome.IN_PROGRESS, "a delivery holds the run's live lease"
            else:
                outcome = ReplayOutcome.REPLAYED
                reason = f"reset from {status}" + (f" ({error})" if error else "")
                await session.execute(_RESET_RUN, {"p_run_id": run_id})
                await session.execute(_RESET_STEPS, {"p_run_id": run_id})
            for dead_letter in fresh:
                if (dead_letter.message_id, outcome) in recorded:
                    continue  # the same decision about the same dead letter is kept once
                session.add(
                    _dead_letter(
                        run_id,
                        dead_letter.message_id,
                        dead_letter.source_subscription,
                        dead_letter.delivery_attempts,
                        outcome,
                        _REPLAY_REASON + reason,
                    )
                )
            return Replay(outcome, reason, run_job)


def _dead_letter(
    run_id: str | None,
    message_id: str | None,
    source_subscription: str | None,
    delivery_attempts: int | None,
    action: str,
    reason: str,
) -> DeadLetter:
    return DeadLetter(
        received_at=utcnow(),
        run_id=run_id,
        message_id=message_id,
        source_subscription=source_subscription,
        delivery_attempts=delivery_attempts,
        action=action,
        reason=reason,
    )


_RESET_RUN = (
    update(Run)
    .where(Run.id == bindparam("p_run_id"))
    .values(
        status=RunStatus.QUEUED,
        error_message=None,
        started_at=None,
        queued_at=db_time(),
        completed_at=None,
        lease_owner=None,
        lease_expires_at=None,
        published_at=None,
        requeue_count=Run.requeue_count + 1,
        updated_at=db_time(),
    )
    .execution_options(synchronize_session=False)
)
_RESET_STEPS = (
    update(StepProgress)
    .where(
        StepProgress.run_id == bindparam("p_run_id"),
        StepProgress.status.in_((StepStatus.FAILED, StepStatus.RUNNING)),
    )
    .values(status=StepStatus.PENDING, error_message=None, started_at=None)
    .execution_options(synchronize_session=False)
)
