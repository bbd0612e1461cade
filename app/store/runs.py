"""The run repository: runs, their steps, reviews and decisions, leases, quarantine.

Every method is one short transaction or one statement in autocommit (`app/store/base.py` owns
both, and every commit); none is held across an LLM call. Writes made while a pipeline runs are
fenced by the lease: they apply only while the caller still owns the run.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from sqlalchemy import (
    Float,
    Integer,
    String,
    Text,
    bindparam,
    delete,
    func,
    insert,
    select,
    true,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import selectinload

from app.domain.models import (
    SCHEMA_VERSION,
    Decision,
    PersonaReview,
    Priority,
    Proposal,
    RunType,
    TokenUsage,
)
from app.domain.personas import AGGREGATE_STEP, EXPAND_STEP, PERSONAS, STEP_NAMES
from app.domain.pipeline import Checkpoint, RunInput
from app.domain.pricing import COST_DECIMALS
from app.domain.prompts import PROMPT_SET_VERSION
from app.domain.revisions import ParentReview, Revision, read_edits
from app.errors import InvalidRunInput, LeaseLost
from app.store.base import Repository, db_time
from app.store.events import (
    EventName,
    RunEvent,
    add_event,
    next_event_numbers,
    run_failed_event,
    step_event,
)
from app.store.tables import (
    DeadLetter,
    PersonaReviewRow,
    QuarantinedMessage,
    Run,
    RunEventRow,
    StepProgress,
    UTCDateTime,
)

_PERSONA_BY_STEP = {p.step_name: p for p in PERSONAS}


class RunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class ClaimOutcome(StrEnum):
    CLAIMED = "claimed"
    NOT_FOUND = "not_found"
    FINISHED = "finished"  # completed or failed: nothing left to do
    BUSY = "busy"  # another delivery holds a live lease
    NOT_STARTED = "not_started"  # queued, and the claim took only started runs


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    status: str | None = None
    # The run's time so far since its first claim, on the database's clock.
    elapsed_seconds: float = 0.0
    delivery_count: int = 0


@dataclass(frozen=True)
class RunTotals:
    """What a run consumed so far, for the lines that report its end (`job_completed`,
    `job_failed`): its time since the first claim (since it was queued when never claimed),
    its tokens and their cost summed over its steps (None once a step's cost is unknown)."""

    run_type: str
    priority: str
    elapsed_seconds: float
    usage: TokenUsage
    cost_usd: float | None

    def log_fields(self) -> dict[str, Any]:
        return {
            "elapsed_time": self.elapsed_seconds,
            "input_tokens": self.usage.input_tokens,
            "output_tokens": self.usage.output_tokens,
            "total_tokens": self.usage.total_tokens,
            "cost_usd": self.cost_usd,
            "run_type": self.run_type,
            "priority": self.priority,
        }


def utcnow() -> datetime:
    return datetime.now(UTC)


UNFINISHED = (RunStatus.QUEUED, RunStatus.RUNNING)


def no_live_lease() -> Any:
    """SQL condition: nobody holds the run's lease (judged on the database's clock)."""
    return Run.lease_owner.is_(None) | (Run.lease_expires_at < db_time())


class RunStore(Repository):
    """Runs, their steps, reviews and decisions, leases, and quarantined messages."""

    # --- creating and reading runs -------------------------------------------------------

    async def create_run(
        self,
        idea: str,
        extra_context: str | dict[str, Any] | None,
        source_key: str | None = None,
        priority: Priority = "normal",
    ) -> Run:
        """A queued initial run with its seven pending steps."""
        async with self._transaction() as session:
            return _add_run(
                session, idea, extra_context, source_key, run_type="initial", priority=priority
            )

    async def create_revision(
        self,
        parent: Run,
        idea: str,
        extra_context: str | dict[str, Any] | None,
        edits: dict[str, Any],
        priority: Priority,
        model: str | None,
        temperature: float | None,
    ) -> Run:
        """A queued revision of the completed run `parent`; `edits` holds the request's
        `edited_proposal` and `edit_notes`, read again by the pipeline."""
        async with self._transaction() as session:
            return _add_run(
                session,
                idea,
                extra_context,
                None,
                run_type="revision",
                priority=priority,
                parent_run_id=parent.id,
                revision=edits,
                model=model,
                temperature=temperature,
            )

    async def run_for_message(
        self, source_key: str, idea: str, extra_context: str | dict[str, Any] | None
    ) -> tuple[Run, bool]:
        """The run for a self-contained job message, created on first sight; (run, created)."""
        existing = await self.run_by_source(source_key)
        if existing is not None:
            return existing, False
        try:
            return await self.create_run(idea, extra_context, source_key), True
        except IntegrityError:
            # A concurrent delivery of the same message created it first.
            existing = await self.run_by_source(source_key)
            if existing is None:
                raise
            return existing, False

    async def run_by_source(self, source_key: str) -> Run | None:
        """The run made from the pushed message with this subscription/messageId, if any."""
        async with self._transaction() as session:
            result = await session.execute(select(Run).where(Run.source_key == source_key))
            return result.scalar_one_or_none()

    async def get_run(self, run_id: str) -> Run | None:
        """The run with its steps and reviews loaded."""
        async with self._transaction() as session:
            result = await session.execute(
                select(Run)
                .where(Run.id == run_id)
                .options(selectinload(Run.steps), selectinload(Run.reviews))
            )
            return result.scalar_one_or_none()

    async def list_runs(
        self,
        limit: int,
        offset: int,
        *,
        status: str | None = None,
        decision: str | None = None,
        run_type: RunType | None = None,
        parent_run_id: str | None = None,
        min_confidence: float | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> tuple[Sequence[Run], int]:
        """Newest first, with the total matching the filters (all of them: AND).

        `created_after` is inclusive, `created_before` exclusive.
        """
        filters = []
        if status is not None:
            filters.append(Run.status == status)
        if decision is not None:
            filters.append(Run.decision_label == decision)
        if run_type is not None:
            filters.append(Run.run_type == run_type)
        if parent_run_id is not None:
            filters.append(Run.parent_run_id == parent_run_id)
        if min_confidence is not None:
            filters.append(Run.overall_weighted_confidence >= min_confidence)
        if created_after is not None:
            filters.append(Run.created_at >= created_after)
        if created_before is not None:
            filters.append(Run.created_at < created_before)
        async with self._transaction() as session:
            total = await session.scalar(select(func.count()).select_from(Run).where(*filters))
            result = await session.execute(
                select(Run)
                .where(*filters)
                .order_by(Run.created_at.desc(), Run.id.desc())
                .limit(limit)
                .offset(offset)
                .options(selectinload(Run.steps))
            )
            return result.scalars().all(), int(total or 0)

    async def run_totals(self, run_id: str) -> RunTotals | None:
        """The run's type, priority, time so far, and tokens and cost over its steps."""
        steps = (
            select(
                func.coalesce(func.sum(StepProgress.input_tokens), 0),
                func.coalesce(func.sum(StepProgress.output_tokens), 0),
                func.coalesce(func.sum(StepProgress.total_tokens), 0),
                func.coalesce(func.sum(StepProgress.cost_usd), 0.0),
                # SUM skips NULLs: a step of unknown cost makes the run's unknown.
                func.count() - func.count(StepProgress.cost_usd),
            )
            .where(StepProgress.run_id == run_id)
            .subquery()
        )
        result = await self._statement(
            select(
                Run.run_type,
                Run.priority,
                func.coalesce(Run.started_at, Run.queued_at),
                db_time(),
                *steps.c,
            )
            # The steps' sums are one row: joined to the run's on nothing.
            .join_from(Run, steps, true())
            .where(Run.id == run_id)
        )
        row = result.one_or_none()
        if row is None:
            return None
        run_type, priority, since, now, tokens_in, tokens_out, total, cost, unknown = tuple(row)
        return RunTotals(
            run_type=run_type,
            priority=priority,
            elapsed_seconds=max((now - since).total_seconds(), 0.0),
            usage=TokenUsage(int(tokens_in), int(tokens_out), int(total)),
            cost_usd=None if unknown else round(float(cost), COST_DECIMALS),
        )

    # --- claiming and leases -------------------------------------------------------------

    async def status(self, run_id: str) -> str | None:
        """The run's status (one primary-key read), or None when there is no such run."""
        result = await self._statement(select(Run.status).where(Run.id == run_id))
        status = result.scalar_one_or_none()
        return None if status is None else str(status)

    async def claim(
        self,
        run_id: str,
        owner: str,
        lease_seconds: float,
        delivery_attempt: int | None,
        started_only: bool = False,
    ) -> Claim:
        """Take the run's lease with one conditional UPDATE; explain why when it cannot.

        `started_only` (the daily budget is spent) takes only runs an earlier delivery
        started; a queued run is then `NOT_STARTED`, left as it is.
        """
        state = (Run.status, Run.started_at, Run.delivery_count, db_time())
        claimable = (RunStatus.RUNNING,) if started_only else UNFINISHED
        claimed = (
            await self._statement(
                update(Run)
                .where(Run.id == run_id, Run.status.in_(claimable), no_live_lease())
                .values(
                    status=RunStatus.RUNNING,
                    lease_owner=owner,
                    lease_expires_at=db_time(lease_seconds),
                    started_at=func.coalesce(Run.started_at, db_time()),
                    delivery_count=Run.delivery_count + 1,
                    last_delivery_attempt=func.coalesce(
                        delivery_attempt, Run.last_delivery_attempt
                    ),
                    updated_at=db_time(),
                )
                .returning(*state)
            )
        ).one_or_none()
        # Not claimed: a second look says why (a later change of state only sharpens it).
        row = (
            claimed or (await self._statement(select(*state).where(Run.id == run_id))).one_or_none()
        )
        if row is None:
            return Claim(ClaimOutcome.NOT_FOUND)
        status, started_at, delivery_count, now = tuple(row)
        elapsed = (now - started_at).total_seconds() if started_at is not None else 0.0
        if claimed is not None:
            outcome = ClaimOutcome.CLAIMED
        elif status in (RunStatus.COMPLETED, RunStatus.FAILED):
            outcome = ClaimOutcome.FINISHED
        elif status == RunStatus.QUEUED and started_only:
            outcome = ClaimOutcome.NOT_STARTED
        else:
            outcome = ClaimOutcome.BUSY
        return Claim(outcome, status, elapsed, delivery_count)

    async def defer(self, run_id: str, until: datetime) -> bool:
        """Leave a queued run for the sweep to hand to the queue again after `until`;
        False when it is no longer queued or a delivery holds it."""
        result = await self._statement(
            update(Run)
            .where(Run.id == run_id, Run.status == RunStatus.QUEUED, no_live_lease())
            .values(deferred_until=until, updated_at=db_time())
        )
        return _rowcount(result) == 1

    async def heartbeat(self, run_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend the lease; False when it is no longer ours."""
        result = await self._statement(
            update(Run)
            .where(Run.id == run_id, Run.lease_owner == owner)
            .values(lease_expires_at=db_time(lease_seconds))
        )
        return _rowcount(result) == 1

    async def release(self, run_id: str, owner: str, error: str | None) -> None:
        """Give the lease back, keeping every checkpoint; the run stays resumable."""
        async with self._transaction() as session:
            await session.execute(
                update(Run)
                .where(Run.id == run_id, Run.lease_owner == owner)
                .values(
                    lease_owner=None,
                    lease_expires_at=None,
                    error_message=error,
                    updated_at=db_time(),
                )
                .execution_options(synchronize_session=False)
            )

    async def load_work(self, run_id: str) -> tuple[RunInput, Checkpoint]:
        """The run's input (with its parent's work, for a revision) and whatever earlier
        deliveries completed."""
        async with self._transaction() as session:
            run = await session.get(Run, run_id, options=[selectinload(Run.reviews)])
            if run is None:
                raise LookupError(run_id)
            checkpoint = Checkpoint(
                proposal=Proposal.model_validate(run.proposal) if run.proposal else None,
                reviews={
                    row.persona_id: PersonaReview.model_validate(row.review) for row in run.reviews
                },
            )
            revision = None
            if run.parent_run_id is not None:
                revision = await _revision_of(session, run)
            work = RunInput(
                run.id,
                run.input_idea,
                run.extra_context,
                model=run.model,
                temperature=run.temperature,
                revision=revision,
            )
            return work, checkpoint

    # --- progress, fenced by the lease ---------------------------------------------------

    async def step_started(self, run_id: str, owner: str, step: str) -> int:
        """Count a new attempt of `step`; its number across all deliveries."""
        params = _step_params(run_id, owner, step, now=utcnow())
        return await self._step_attempt(
            run_id, owner, step, _STEP_STARTED, params, "step_started", StepStatus.RUNNING
        )

    async def attempt_failed(
        self,
        run_id: str,
        owner: str,
        step: str,
        error: str,
        usage: TokenUsage,
        model: str | None = None,
        cost_usd: float | None = 0.0,
    ) -> None:
        """Add a failed call's tokens, model and cost to the step; keep its error."""
        params = _step_params(run_id, owner, step, usage, model, cost_usd, error=error)
        await self._step_attempt(
            run_id,
            owner,
            step,
            _STEP_ATTEMPT_FAILED,
            params,
            "step_attempt_failed",
            StepStatus.RUNNING,
            error_message=error,
        )

    async def step_failed(self, run_id: str, owner: str, step: str, error: str) -> None:
        params = _step_params(run_id, owner, step, error=error)
        await self._step_attempt(
            run_id,
            owner,
            step,
            _STEP_FAILED,
            params,
            "step_failed",
            StepStatus.FAILED,
            error_message=error,
        )

    async def _step_attempt(
        self,
        run_id: str,
        owner: str,
        step: str,
        statement: Any,
        params: dict[str, Any],
        event: EventName,
        status: StepStatus,
        **fields: Any,
    ) -> int:
        """Apply `statement` (which returns the step's attempts) to the step under the lease,
        with its event; the step's attempt count."""
        async with self._progress() as (connection, events):
            seq = await _next_event(connection, run_id, owner)
            attempts = int((await connection.execute(statement, params)).scalar_one())
            data = step_event(step, status, attempt=attempts, **fields)
            await add_event(connection, events, run_id, seq, event, data)
        return attempts

    async def step_completed(
        self,
        run_id: str,
        owner: str,
        step: str,
        output: BaseModel,
        usage: TokenUsage,
        model: str | None = None,
        cost_usd: float | None = 0.0,
    ) -> None:
        """Persist the step's output and mark it completed, atomically (the checkpoint),
        with the last call's tokens, model and cost added to the step's."""
        now = utcnow()
        params = _step_params(run_id, owner, step, usage, model, cost_usd, now=now)
        async with self._progress() as (connection, events):
            # The run's own fenced UPDATE comes first (it takes the event numbers, and for the
            # proposal and the decision writes them on the run), so its row is locked once,
            # exclusively, before anything else. The decision is the last checkpoint: storing
            # it completes the run and drops the lease.
            result: dict[str, Any] = {}
            if step == EXPAND_STEP:
                result = {"proposal": output.model_dump(mode="json")}
            elif step == AGGREGATE_STEP:
                assert isinstance(output, Decision)
                result = {
                    "decision": output.model_dump(mode="json"),
                    "decision_label": output.decision,
                    "overall_weighted_confidence": output.overall_weighted_confidence,
                    "status": RunStatus.COMPLETED,
                    "completed_at": db_time(),
                    "updated_at": db_time(),
                    "error_message": None,
                    "lease_owner": None,
                    "lease_expires_at": None,
                }
            count = 2 if step == AGGREGATE_STEP else 1
            seq = await _next_event(connection, run_id, owner, count=count, **result)
            totals = (await connection.execute(_STEP_COMPLETED, params)).one()
            if step in _PERSONA_BY_STEP:
                assert isinstance(output, PersonaReview)
                await connection.execute(_INSERT_REVIEW, _review_row(run_id, step, output, now))
            data = step_event(step, StepStatus.COMPLETED, **totals._asdict())
            await add_event(connection, events, run_id, seq - count + 1, "step_completed", data)
            if isinstance(output, Decision):
                decided = {
                    "status": RunStatus.COMPLETED,
                    "decision_label": output.decision,
                    "overall_weighted_confidence": output.overall_weighted_confidence,
                }
                await add_event(connection, events, run_id, seq, "run_completed", decided)

    async def step_reused(
        self, run_id: str, owner: str, step: str, review: PersonaReview, origin_run_id: str
    ) -> None:
        """Take over the parent's review for `step`: completed without a call, and
        `reused_from_run_id` names the run that made it.

        The status stays one the reference's clients know (they show any other as pending).
        """
        now = utcnow()
        params = _step_params(run_id, owner, step, now=now, origin=origin_run_id)
        async with self._progress() as (connection, events):
            seq = await _next_event(connection, run_id, owner)
            totals = (await connection.execute(_STEP_REUSED, params)).one()
            await connection.execute(_INSERT_REVIEW, _review_row(run_id, step, review, now))
            data = step_event(step, StepStatus.COMPLETED, **totals._asdict())
            await add_event(connection, events, run_id, seq, "step_completed", data)

    async def fail(self, run_id: str, owner: str, error: str) -> bool:
        """Mark the run failed for good; False if the lease was no longer ours."""
        async with self._progress() as (connection, events):
            return await fail_run(connection, events, run_id, error, Run.lease_owner == owner)

    # --- quarantine ----------------------------------------------------------------------

    async def quarantine(
        self,
        reason: str,
        raw_body: bytes,
        headers: dict[str, str],
        message_id: str | None,
        subscription: str | None,
    ) -> int:
        return await self._insert(
            QuarantinedMessage(
                received_at=utcnow(),
                reason=reason,
                raw_body=raw_body,
                headers=headers,
                message_id=message_id,
                subscription=subscription,
            )
        )

    async def list_quarantined(self, limit: int, offset: int) -> Sequence[QuarantinedMessage]:
        async with self._transaction() as session:
            result = await session.execute(
                select(QuarantinedMessage)
                .order_by(QuarantinedMessage.id.desc())
                .limit(limit)
                .offset(offset)
            )
            return result.scalars().all()

    async def list_attention(self, limit: int) -> list[Run]:
        """Runs an operator should look at: failed, or unfinished and not held by a live lease."""
        async with self._transaction() as session:
            result = await session.execute(
                select(Run)
                .where(
                    (Run.status == RunStatus.FAILED)
                    | (Run.status.in_(UNFINISHED) & no_live_lease())
                )
                .order_by(Run.updated_at.desc())
                .limit(limit)
                .options(selectinload(Run.steps))
            )
            return list(result.scalars().all())

    async def delete_all(self) -> None:
        """Empty every table (tests and local resets only)."""
        async with self._transaction() as session:
            for table in (
                DeadLetter,
                QuarantinedMessage,
                RunEventRow,
                PersonaReviewRow,
                StepProgress,
                Run,
            ):
                await session.execute(delete(table))


def _review_row(run_id: str, step: str, review: PersonaReview, now: datetime) -> dict[str, Any]:
    persona = _PERSONA_BY_STEP[step]
    return {
        "run_id": run_id,
        "persona_id": persona.persona_id,
        "persona_name": persona.name,
        "weight": persona.weight,
        "confidence_score": review.confidence_score,
        "review": review.model_dump(mode="json"),
        "created_at": now,
    }


async def _revision_of(session: AsyncSession, run: Run) -> Revision:
    """What the revision `run` starts from; InvalidRunInput when its parent cannot give it."""
    parent = await session.get(
        Run, run.parent_run_id, options=[selectinload(Run.reviews), selectinload(Run.steps)]
    )
    if parent is None or parent.proposal is None:
        raise InvalidRunInput(f"parent run {run.parent_run_id} has no proposal to revise")
    origin = {step.step_name: step.reused_from_run_id for step in parent.steps}
    edits = run.revision or {}
    try:
        read = read_edits(edits.get("edited_proposal"), edits.get("edit_notes"))
    except ValueError as exc:
        raise InvalidRunInput(f"revision edits are invalid: {exc}") from exc
    return Revision(
        parent_run_id=parent.id,
        parent_proposal=Proposal.model_validate(parent.proposal),
        parent_reviews={
            row.persona_id: ParentReview(
                PersonaReview.model_validate(row.review),
                # Reused in the parent too: the run whose call produced it.
                origin.get(f"review_{row.persona_id}") or parent.id,
            )
            for row in parent.reviews
        },
        edits=read,
    )


def _add_run(
    session: AsyncSession,
    idea: str,
    extra_context: str | dict[str, Any] | None,
    source_key: str | None,
    **fields: Any,
) -> Run:
    now = utcnow()
    run = Run(
        id=str(uuid.uuid4()),
        **fields,
        schema_version=SCHEMA_VERSION,
        prompt_set_version=PROMPT_SET_VERSION,
        status=RunStatus.QUEUED,
        input_idea=idea,
        extra_context=extra_context,
        source_key=source_key,
        delivery_count=0,
        created_at=now,
        updated_at=now,
        queued_at=now,
        # A run made from a pushed message came from the queue: nothing to publish.
        published_at=now if source_key is not None else None,
        steps=[
            StepProgress(
                step_name=name,
                step_order=order,
                status=StepStatus.PENDING,
                attempts=0,
                input_tokens=0,
                output_tokens=0,
                total_tokens=0,
                cost_usd=0.0,
            )
            for order, name in enumerate(STEP_NAMES, start=1)
        ],
        reviews=[],
    )
    session.add(run)
    return run


def _step_params(
    run_id: str,
    owner: str,
    step: str,
    usage: TokenUsage | None = None,
    model: str | None = None,
    cost_usd: float | None = 0.0,
    **values: Any,
) -> dict[str, Any]:
    """Parameters of the step statements below."""
    usage = usage or TokenUsage()
    spent = usage != TokenUsage()
    # Prefixed: an UPDATE reserves its columns' own names for its SET clause.
    named = {
        "run_id": run_id,
        "owner": owner,
        "step": step,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "model": model,
        "cost_usd": cost_usd,
        "spent_at": utcnow() if spent else None,
        **values,
    }
    return {f"p_{name}": value for name, value in named.items()}


async def fail_run(
    connection: AsyncConnection,
    events: list[RunEvent],
    run_id: str,
    error: str,
    *fence: Any,
) -> bool:
    """Mark the run failed for good, with its `run_failed` event, where `fence` holds; False
    when it does not (the caller's transaction)."""
    seq = await connection.scalar(
        next_event_numbers(Run.id == run_id, *fence).values(
            status=RunStatus.FAILED,
            error_message=error,
            completed_at=db_time(),
            updated_at=db_time(),
            lease_owner=None,
            lease_expires_at=None,
        )
    )
    if seq is None:
        return False
    await add_event(connection, events, run_id, seq, "run_failed", run_failed_event(error))
    return True


async def _next_event(
    connection: AsyncConnection, run_id: str, owner: str, count: int = 1, **values: Any
) -> int:
    """Take the run's next `count` event numbers (and write `values` on it) while `owner` holds
    its lease; the last number taken. `LeaseLost` when the lease is no longer `owner`'s."""
    params = {"p_run_id": run_id, "p_owner": owner}
    if count == 1 and not values:
        seq = await connection.scalar(_NEXT_EVENT, params)
    else:
        statement = next_event_numbers(*_LEASED, count=count).values(**values)
        seq = await connection.scalar(statement, params)
    if seq is None:
        raise _lease_lost(run_id, owner)
    return int(seq)


def _lease_lost(run_id: str, owner: str) -> LeaseLost:
    return LeaseLost(f"run {run_id} is no longer leased by {owner}")


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0))


# The step writes of the hot path, built once: SQLAlchemy reuses a statement object's compiled
# form, while a new object per call paid for its cache key (a tenth of a run's CPU). Each runs
# after `_next_event`, whose fenced UPDATE of the run's row holds that row locked until the
# commit: a takeover waits for the write, and a write after a takeover changes nothing.

# The run is still `owner`'s: a progress write takes its event number only under this fence.
_LEASED = (
    Run.id == bindparam("p_run_id"),
    Run.lease_owner == bindparam("p_owner"),
    Run.status == RunStatus.RUNNING,
)
_NEXT_EVENT = next_event_numbers(*_LEASED)
_THIS_STEP = (
    StepProgress.run_id == bindparam("p_run_id"),
    StepProgress.step_name == bindparam("p_step"),
)
# A NULL cost (a call of a model without a price) makes the step's cost NULL for good.
_ADD_USAGE = {
    "input_tokens": StepProgress.input_tokens + bindparam("p_input_tokens", type_=Integer()),
    "output_tokens": StepProgress.output_tokens + bindparam("p_output_tokens", type_=Integer()),
    "total_tokens": StepProgress.total_tokens + bindparam("p_total_tokens", type_=Integer()),
    "cost_usd": StepProgress.cost_usd + bindparam("p_cost_usd", type_=Float()),
    "model": func.coalesce(bindparam("p_model", type_=String()), StepProgress.model),
    "spent_at": func.coalesce(bindparam("p_spent_at", type_=UTCDateTime()), StepProgress.spent_at),
}
_NOW = bindparam("p_now", type_=UTCDateTime())
_ERROR = bindparam("p_error", type_=Text())
# What a completed step's event reports: the step's totals over all its calls.
_TOTALS = (
    StepProgress.input_tokens,
    StepProgress.output_tokens,
    StepProgress.total_tokens,
    StepProgress.cost_usd,
    StepProgress.model,
    StepProgress.reused_from_run_id,
)

_STEP_STARTED = (
    update(StepProgress)
    .where(*_THIS_STEP)
    .values(
        status=StepStatus.RUNNING,
        attempts=StepProgress.attempts + 1,
        started_at=func.coalesce(StepProgress.started_at, _NOW),
    )
    .returning(StepProgress.attempts)
    .execution_options(synchronize_session=False)
)
_STEP_ATTEMPT_FAILED = (
    update(StepProgress)
    .where(*_THIS_STEP)
    .values(**_ADD_USAGE, error_message=_ERROR)
    .returning(StepProgress.attempts)
    .execution_options(synchronize_session=False)
)
_STEP_FAILED = (
    update(StepProgress)
    .where(*_THIS_STEP)
    .values(status=StepStatus.FAILED, error_message=_ERROR)
    .returning(StepProgress.attempts)
    .execution_options(synchronize_session=False)
)
_STEP_COMPLETED = (
    update(StepProgress)
    .where(*_THIS_STEP)
    .values(**_ADD_USAGE, status=StepStatus.COMPLETED, completed_at=_NOW, error_message=None)
    .returning(*_TOTALS)
    .execution_options(synchronize_session=False)
)
_STEP_REUSED = (
    update(StepProgress)
    .where(*_THIS_STEP)
    .values(
        status=StepStatus.COMPLETED,
        started_at=_NOW,
        completed_at=_NOW,
        error_message=None,
        # Taken over without a call: it costs this run nothing.
        cost_usd=0.0,
        reused_from_run_id=bindparam("p_origin", type_=Text()),
    )
    .returning(*_TOTALS)
    .execution_options(synchronize_session=False)
)
_INSERT_REVIEW = insert(PersonaReviewRow)
