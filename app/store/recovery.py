"""Queries of the recovery paths: the outbox, runs nobody is working on, dead letters.

Every decision is one conditional UPDATE judged on the database's clock, so two instances
sweeping at once never hand the same run to the queue twice in one round.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, update

from app.domain.models import Priority, RunType
from app.store.base import Repository, db_time
from app.store.runs import UNFINISHED, RunStatus, no_live_lease, utcnow
from app.store.tables import DeadLetter, Run


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


_JOB_COLUMNS = (Run.id, Run.run_type, Run.priority)


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
        sweep leaves it alone for the next `stale_seconds`)."""
        async with self._transaction() as session:
            candidates = (
                select(Run.id)
                .where(
                    Run.status.in_(UNFINISHED),
                    Run.published_at.is_not(None),
                    no_live_lease(),
                    Run.updated_at < db_time(-stale_seconds),
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
        first claim, or from the moment they were queued for runs never claimed."""
        async with self._transaction() as session:
            result = await session.execute(
                select(Run.id)
                .where(
                    Run.status.in_(UNFINISHED),
                    no_live_lease(),
                    func.coalesce(Run.started_at, Run.queued_at) < db_time(-job_timeout_seconds),
                )
                .order_by(Run.queued_at)
                .limit(limit)
            )
            return list(result.scalars().all())

    async def fail_unleased(self, run_id: str, reason: str) -> bool:
        """Fail an unfinished run nobody holds; the reason keeps the run's last error.
        False when the run finished or was claimed meanwhile."""
        async with self._transaction() as session:
            last_error = await session.scalar(select(Run.error_message).where(Run.id == run_id))
            error = f"{reason}; last error: {last_error}" if last_error else reason
            result = await session.execute(
                update(Run)
                .where(Run.id == run_id, Run.status.in_(UNFINISHED), no_live_lease())
                .values(
                    status=RunStatus.FAILED,
                    error_message=error,
                    completed_at=db_time(),
                    updated_at=db_time(),
                    lease_owner=None,
                    lease_expires_at=None,
                )
                .execution_options(synchronize_session=False)
            )
            return int(getattr(result, "rowcount", 0)) == 1

    async def run_state(self, run_id: str) -> RunState | None:
        async with self._transaction() as session:
            row = (
                await session.execute(
                    select(
                        Run.status,
                        Run.lease_owner.is_not(None) & (Run.lease_expires_at >= db_time()),
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
            DeadLetter(
                received_at=utcnow(),
                run_id=run_id,
                message_id=message_id,
                source_subscription=source_subscription,
                delivery_attempts=delivery_attempts,
                action=action,
                reason=reason,
            )
        )
