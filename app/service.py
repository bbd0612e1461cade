"""Where the store and the domain meet: claim a run, run the pipeline with checkpoints, persist.

`Runner.execute` turns one delivery of a run into an `Outcome`; `PushReceiver.handle` turns one
push request into an `Outcome`, quarantining what cannot be a job.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from loguru import logger
from opentelemetry import trace
from pydantic import BaseModel

from app.bounded import BoundedDict
from app.cost import CostMeter, DailyBudget
from app.domain.llm import LLM, LLMRequest, LLMResult, T
from app.domain.models import PersonaReview, TokenUsage
from app.domain.personas import AGGREGATE_STEP
from app.domain.pipeline import PipelineConfig, run_pipeline
from app.domain.pricing import DEFAULT_PRICES, add_costs
from app.errors import (
    LeaseExpired,
    LeaseLost,
    PermanentError,
    StoreUnavailable,
    TransientError,
)
from app.push.envelope import (
    MalformedPush,
    PushMessage,
    decode_push,
    parse_job,
    quarantine_headers,
)
from app.push.policy import Outcome
from app.store.runs import ClaimOutcome, RunStatus, RunStore, RunTotals
from app.tracing import DeliverySpans

R = TypeVar("R")


@dataclass(frozen=True)
class ExecutionLimits:
    lease_seconds: float
    push_deadline_seconds: float
    job_timeout_seconds: float
    max_concurrent_runs: int

    @property
    def slot_wait_seconds(self) -> float:
        """How long a delivery may wait for a run slot: runs are I/O-bound and finish in
        seconds, so a short queue beats a redelivery; a quarter of the push deadline at most,
        and the wait is taken from the delivery's budget."""
        return min(SLOT_WAIT_SECONDS, self.push_deadline_seconds / 4)


SLOT_WAIT_SECONDS = 30.0

# Finished runs, and the runs of pushed messages, remembered per instance, so a redelivery
# storm of finished work is answered without the database.
FINISHED_RUNS_REMEMBERED = 10_000
MESSAGE_RUNS_REMEMBERED = 10_000
_FINISHED = frozenset({RunStatus.COMPLETED, RunStatus.FAILED})

# Bounds the store calls made after the work is over (release, fail) so that a database that
# hangs cannot hold a delivery, or the shutdown, past its deadline: the lease expires anyway.
WRAP_UP_TIMEOUT_SECONDS = 2.0


class _ModelsUsed:
    """The pipeline's LLM, noting the model of each step's last call: the model that
    answered, else (the call failed) the one asked for."""

    def __init__(self, llm: LLM) -> None:
        self._llm = llm
        self.by_step: dict[str, str] = {}

    def slot(self) -> AbstractAsyncContextManager[None]:
        return self._llm.slot()

    async def generate(self, request: LLMRequest[T]) -> LLMResult[T]:
        self.by_step[request.step] = request.model
        result = await self._llm.generate(request)
        self.by_step[request.step] = result.model or request.model
        return result


@dataclass
class _StepTally:
    """One step in this delivery: since when, its last attempt, and what its calls used."""

    started: float
    attempt: int = 0
    usage: TokenUsage = field(default_factory=TokenUsage)
    cost_usd: float | None = 0.0


class _StoreProgress:
    """The pipeline's `Progress`, persisted through the store under this delivery's lease.

    Each call's tokens are priced and stored with the step; the step's log lines say what the
    step took in this delivery (`elapsed_time`, tokens and cost of all its attempts).
    """

    def __init__(
        self,
        store: RunStore,
        run_id: str,
        owner: str,
        models: _ModelsUsed,
        meter: CostMeter,
        spans: DeliverySpans | None = None,
    ) -> None:
        self._store = store
        self._spans = spans or DeliverySpans(trace.NoOpTracer(), run_id)
        self._run_id = run_id
        self._owner = owner
        self._models = models
        self._meter = meter
        self._steps: dict[str, _StepTally] = {}
        self._loop = asyncio.get_running_loop()
        # Storing the decision completes the run and drops its lease.
        self.run_completed = False

    async def step_started(self, step: str) -> int:
        self._spans.step_started(step)
        attempt = await self._store.step_started(self._run_id, self._owner, step)
        self._spans.attempt(step, attempt)
        self._tally(step).attempt = attempt
        logger.info("step started", lifecycle_event="step_started", step_name=step, attempt=attempt)
        return attempt

    async def attempt_failed(self, step: str, error: str, usage: TokenUsage) -> None:
        self._spans.attempt_failed(step, error)
        model, cost = self._priced(step, usage)
        await self._store.attempt_failed(self._run_id, self._owner, step, error, usage, model, cost)
        logger.warning("step attempt failed: {}", error, step_name=step)

    async def step_failed(self, step: str, error: str) -> None:
        await self._store.step_failed(self._run_id, self._owner, step, error)
        logger.error(
            "step failed: {}",
            error,
            lifecycle_event="step_failed",
            error_message=error,
            **self._step_fields(step),
        )
        self._spans.step_ended(step, error)

    async def step_completed(self, step: str, output: BaseModel, usage: TokenUsage) -> None:
        model, cost = self._priced(step, usage)
        await self._store.step_completed(
            self._run_id, self._owner, step, output, usage, model, cost
        )
        self.run_completed = step == AGGREGATE_STEP
        logger.info("step completed", lifecycle_event="step_completed", **self._step_fields(step))
        self._spans.step_ended(step)

    async def step_reused(self, step: str, review: PersonaReview, origin_run_id: str) -> None:
        self._spans.step_started(step, reused_from=origin_run_id)
        await self._store.step_reused(self._run_id, self._owner, step, review, origin_run_id)
        self._spans.step_ended(step)
        logger.info("step reused from run {}", origin_run_id, step_name=step)

    def _tally(self, step: str) -> _StepTally:
        tally = self._steps.get(step)
        if tally is None:
            tally = self._steps[step] = _StepTally(started=self._loop.time())
        return tally

    def _priced(self, step: str, usage: TokenUsage) -> tuple[str | None, float | None]:
        """The model of the step's last call and what `usage` of it cost, added to the tally."""
        model = self._models.by_step.get(step)
        cost = self._meter.cost(model, usage)
        tally = self._tally(step)
        tally.usage += usage
        tally.cost_usd = add_costs((tally.cost_usd, cost))
        return model, cost

    def _step_fields(self, step: str) -> dict[str, Any]:
        tally = self._tally(step)
        return {
            "step_name": step,
            "elapsed_time": self._loop.time() - tally.started,
            "model": self._models.by_step.get(step),
            "input_tokens": tally.usage.input_tokens,
            "output_tokens": tally.usage.output_tokens,
            "total_tokens": tally.usage.total_tokens,
            "cost_usd": tally.cost_usd,
            "attempt": tally.attempt,
        }


# The fields of `job_completed` and `job_failed` lines that say what the run consumed
# (`RunTotals.log_fields`); null when the database could not tell.
_RUN_FIELDS = (
    "elapsed_time",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost_usd",
    "run_type",
    "priority",
)


class Runner:
    """Executes runs exactly once across concurrent and repeated deliveries."""

    def __init__(
        self,
        store: RunStore,
        llm: LLM,
        config: PipelineConfig,
        limits: ExecutionLimits,
        instance_id: str,
        *,
        meter: CostMeter | None = None,
        budget: DailyBudget | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._store = store
        self._llm = llm
        self._config = config
        self._limits = limits
        self._instance_id = instance_id
        # The delivery's claim and steps as spans (app/tracing.py); a no-op tracer when off.
        self._tracer = tracer or trace.NoOpTracer()
        self._meter = meter or CostMeter(DEFAULT_PRICES)
        # DAILY_BUDGET_USD; None: no budget.
        self._budget = budget
        self._slots = asyncio.Semaphore(limits.max_concurrent_runs)
        # Deliveries waiting for a slot or running: shutdown cancels them all.
        self._deliveries: set[asyncio.Task[object]] = set()
        self._draining = False
        self._finished: BoundedDict[str, str] = BoundedDict(FINISHED_RUNS_REMEMBERED)

    def begin_shutdown(self) -> None:
        """Stop claiming; cancel in-flight pipelines, which keep checkpoints and release leases."""
        if self._draining:
            return
        self._draining = True
        logger.warning("shutting down: releasing {} delivery(ies) in flight", len(self._deliveries))
        for task in self._deliveries:
            task.cancel()

    async def execute(
        self, run_id: str, delivery_attempt: int | None, message_id: str | None = None
    ) -> Outcome | None:
        """One delivery of `run_id`; None when no such run exists. Every line logged about it
        carries `run_id`, `delivery_attempt` and `message_id`."""
        with logger.contextualize(
            run_id=run_id, delivery_attempt=delivery_attempt, message_id=message_id
        ):
            return await self._execute_delivery(run_id, delivery_attempt)

    async def _execute_delivery(self, run_id: str, delivery_attempt: int | None) -> Outcome | None:
        if self._draining:
            return Outcome.SHUTTING_DOWN
        # A duplicate of finished work never waits for a run slot and, once seen, costs no
        # database call. With a slot free, the claim itself tells a finished run apart.
        status = self._finished.get(run_id)
        if status is None and self._slots.locked():
            status = await self._store.status(run_id)
            if status is None:
                return None
            if status in _FINISHED:
                self._remember_finished(run_id, status)
        if status in _FINISHED:
            logger.info(
                "run already {}; acknowledging duplicate delivery",
                status,
                lifecycle_event="idempotent_skip",
            )
            return Outcome.ALREADY_DONE
        task = asyncio.current_task()
        assert task is not None
        owner = f"{self._instance_id}/{uuid.uuid4().hex[:12]}"
        self._deliveries.add(task)
        try:
            try:
                return await self._execute_in_slot(run_id, owner, delivery_attempt)
            except asyncio.CancelledError:
                if not self._draining:
                    raise
                # Cancelled by begin_shutdown: answer 503 instead of dying mid-request.
                task.uncancel()
                await self._release(run_id, owner, "instance shut down; checkpoint kept")
                logger.warning("released run on shutdown", lifecycle_event="job_released")
                return Outcome.SHUTTING_DOWN
        finally:
            self._deliveries.discard(task)

    async def _execute_in_slot(
        self, run_id: str, owner: str, delivery_attempt: int | None
    ) -> Outcome | None:
        """Wait (bounded) for one of `WORKER_MAX_CONCURRENCY` slots, then execute."""
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        try:
            async with asyncio.timeout(self._limits.slot_wait_seconds):
                await self._slots.acquire()
        except TimeoutError:
            logger.warning("no run slot free (WORKER_MAX_CONCURRENCY); asking for redelivery")
            return Outcome.OVERLOADED
        spans = DeliverySpans(self._tracer, run_id)
        try:
            with spans.claim(delivery_attempt) as claim_span:
                outcome = await self._execute(
                    run_id, owner, delivery_attempt, loop.time() - arrived, spans
                )
                claim_span.set_attribute("outcome", str(outcome or "unknown_run"))
                return outcome
        finally:
            self._slots.release()

    async def _execute(
        self,
        run_id: str,
        owner: str,
        delivery_attempt: int | None,
        waited: float,
        spans: DeliverySpans,
    ) -> Outcome | None:
        # With the day's budget spent, only runs already started are claimed: they finish.
        deferred_until = await self._budget.exhausted_until() if self._budget else None
        claim = await self._store.claim(
            run_id,
            owner,
            self._limits.lease_seconds,
            delivery_attempt,
            started_only=deferred_until is not None,
        )
        if claim.outcome is ClaimOutcome.NOT_FOUND:
            return None
        if claim.outcome is ClaimOutcome.NOT_STARTED:
            assert deferred_until is not None
            return await self._defer(run_id, deferred_until)
        if claim.outcome is ClaimOutcome.FINISHED:
            assert claim.status is not None
            self._remember_finished(run_id, claim.status)
            logger.info(
                "run already {}; acknowledging duplicate delivery",
                claim.status,
                lifecycle_event="idempotent_skip",
            )
            return Outcome.ALREADY_DONE
        if claim.outcome is ClaimOutcome.BUSY:
            logger.info("run is leased by another delivery", lifecycle_event="lease_busy")
            return Outcome.LEASE_BUSY

        remaining = self._limits.job_timeout_seconds - claim.elapsed_seconds
        job_timeout = f"job timeout of {self._limits.job_timeout_seconds:g}s exceeded"
        if remaining <= 0:
            return await self._fail(run_id, owner, job_timeout)
        deadline = self._limits.push_deadline_seconds - waited
        budget = min(deadline, remaining)
        job_timeout_binds = remaining <= deadline
        logger.info(
            "job started",
            lifecycle_event="job_started",
            delivery_attempt=delivery_attempt,
            delivery_count=claim.delivery_count,
        )

        try:
            async with asyncio.timeout(budget):
                run, checkpoint = await self._store.load_work(run_id)
                models = _ModelsUsed(self._llm)
                progress = _StoreProgress(self._store, run_id, owner, models, self._meter, spans)
                decision = await self._with_lease(
                    run_id,
                    owner,
                    run_pipeline(run, checkpoint, models, progress, self._config),
                    lambda: progress.run_completed,
                )
            self._remember_finished(run_id, RunStatus.COMPLETED)
        except TimeoutError:
            if job_timeout_binds:
                return await self._fail(run_id, owner, job_timeout)
            return await self._transient(
                run_id, owner, f"delivery deadline of {budget:g}s reached; checkpoint kept"
            )
        except LeaseLost as exc:
            logger.warning("lease lost while working: {}", exc, lifecycle_event="lease_busy")
            return Outcome.LEASE_BUSY
        except PermanentError as exc:
            return await self._fail(run_id, owner, str(exc))
        except TransientError as exc:
            return await self._transient(run_id, owner, str(exc))
        except Exception as exc:
            # A bug or an error nobody classified: never a 500 that keeps the lease.
            logger.opt(exception=exc).error("unexpected error in a delivery; releasing the run")
            return await self._transient(run_id, owner, f"unexpected error: {type(exc).__name__}")
        logger.info(
            "job completed: {}",
            decision.decision,
            lifecycle_event="job_completed",
            decision=decision.decision,
            overall_weighted_confidence=decision.overall_weighted_confidence,
            **await self._run_fields(run_id),
        )
        return Outcome.COMPLETED

    async def _defer(self, run_id: str, until: datetime) -> Outcome:
        """Acknowledge a delivery of a run not yet started while the budget is spent: the run
        stays queued, and the sweep hands it to the queue again after `until`."""
        if not await self._store.defer(run_id, until):
            # Claimed or finished meanwhile: a redelivery will see which.
            return Outcome.LEASE_BUSY
        logger.info(
            "daily budget spent: run deferred until {}",
            until.isoformat(),
            lifecycle_event="job_deferred",
            deferred_until=until.isoformat(),
        )
        return Outcome.DEFERRED

    async def _run_fields(self, run_id: str) -> dict[str, Any]:
        return await run_end_fields(self._store, run_id)

    async def _with_lease(
        self, run_id: str, owner: str, work: Awaitable[R], completed: Callable[[], bool]
    ) -> R:
        """Await `work` while renewing the lease every third of its length.

        Each renewal must land before the lease it extends expires; when the database does not
        answer in time, `work` is cancelled (`LeaseExpired`) rather than going on unfenced.
        Renewals stop with the work: a delivery that no longer runs never keeps its lease; and
        once `completed()` (the run is stored as completed, its lease dropped), the lease is
        gone by design, not lost.
        """
        loop = asyncio.get_running_loop()
        lease = self._limits.lease_seconds
        delivery = asyncio.current_task()
        assert delivery is not None
        task = asyncio.ensure_future(work)
        stopped_by: TransientError | None = None

        async def keep() -> None:
            nonlocal stopped_by
            # Conservative: the claim's expiry was set before this point on the database.
            valid_until = loop.time() + lease
            while not task.done():
                # Every third of the lease; after a failure sooner, halving the time left, so a
                # renewal still lands if the database comes back before the lease expires.
                remaining = valid_until - loop.time()
                await asyncio.sleep(min(lease / 3, max(remaining / 2, lease / 12)))
                sent = loop.time()
                try:
                    async with asyncio.timeout(valid_until - sent):
                        renewed = await self._store.heartbeat(run_id, owner, lease)
                except Exception as exc:
                    if loop.time() < valid_until:
                        logger.warning("lease renewal failed, retrying: {}", exc)
                        continue
                    stopped_by = LeaseExpired(
                        f"run {run_id}: lease could not be renewed before it expired"
                    )
                    task.cancel()
                    return
                if not renewed:
                    if completed():
                        return
                    stopped_by = LeaseLost(f"run {run_id}: lease taken over while working")
                    task.cancel()
                    return
                valid_until = sent + lease

        keeper = asyncio.create_task(keep())
        try:
            return await task
        except asyncio.CancelledError:
            # The keeper stopped the work, not a deadline or shutdown cancelling this delivery.
            if stopped_by is not None and not delivery.cancelling():
                raise stopped_by from None
            raise
        finally:
            keeper.cancel()
            task.cancel()
            # Their clean-up may wait on a database that hangs (a rollback on a dead connection):
            # bounded here, it finishes on its own; nothing renews the lease meanwhile.
            await asyncio.wait({keeper, task}, timeout=WRAP_UP_TIMEOUT_SECONDS)

    async def _transient(self, run_id: str, owner: str, error: str) -> Outcome:
        logger.warning("transient failure, releasing for redelivery: {}", error)
        await self._release(run_id, owner, error)
        return Outcome.RETRY

    async def _release(self, run_id: str, owner: str, error: str) -> None:
        """Give the lease back, bounded: if the database does not answer, it expires."""
        try:
            await _wrap_up(self._store.release(run_id, owner, error))
        except (TimeoutError, StoreUnavailable) as exc:
            logger.warning("could not release the lease; it will expire: {!r}", exc)

    async def _fail(self, run_id: str, owner: str, error: str) -> Outcome:
        try:
            failed = await _wrap_up(self._store.fail(run_id, owner, error))
        except (TimeoutError, StoreUnavailable) as exc:
            logger.warning("could not mark the run failed; a redelivery will: {!r}", exc)
            return Outcome.RETRY
        if not failed:
            return Outcome.LEASE_BUSY
        self._remember_finished(run_id, RunStatus.FAILED)
        logger.error(
            "job failed: {}",
            error,
            lifecycle_event="job_failed",
            error_message=error,
            **await self._run_fields(run_id),
        )
        return Outcome.FAILED

    def _remember_finished(self, run_id: str, status: str) -> None:
        """Remember a completed run, which never runs again, so its duplicates cost no database
        call. A failed run is not remembered: an operator's replay may queue it again."""
        if status == RunStatus.COMPLETED:
            self._finished[run_id] = status


async def run_end_fields(store: RunStore, run_id: str) -> dict[str, Any]:
    """What the run consumed, for its `job_completed` or `job_failed` line (bounded: the run's
    outcome is already stored; a database that does not answer only blanks these fields)."""
    totals: RunTotals | None = None
    try:
        totals = await _wrap_up(store.run_totals(run_id))
    except (TimeoutError, StoreUnavailable) as exc:
        logger.warning("could not read the run's totals for its log line: {!r}", exc)
    if totals is None:
        return dict.fromkeys(_RUN_FIELDS)
    return totals.log_fields()


async def _wrap_up(call: Coroutine[object, object, R]) -> R:
    """Await `call` for at most `WRAP_UP_TIMEOUT_SECONDS`, else raise TimeoutError at once.

    Unlike `asyncio.timeout`, this does not wait for the abandoned call to finish cancelling,
    which on a database that hangs can take as long as the call itself.
    """
    task = asyncio.ensure_future(call)
    done, _ = await asyncio.wait({task}, timeout=WRAP_UP_TIMEOUT_SECONDS)
    if not done:
        task.cancel()
        raise TimeoutError(f"no answer within {WRAP_UP_TIMEOUT_SECONDS:g}s")
    return task.result()


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class PushReceiver:
    """Turns one push request into an outcome: decode, quarantine or resolve the run, execute."""

    def __init__(self, store: RunStore, runner: Runner) -> None:
        self._store = store
        self._runner = runner
        # subscription/messageId -> (run id, digest of the data it was resolved from).
        self._message_runs: BoundedDict[str, tuple[str, bytes]] = BoundedDict(
            MESSAGE_RUNS_REMEMBERED
        )

    async def handle(self, body: bytes, headers: Mapping[str, str]) -> Outcome:
        try:
            return await self._handle(body, headers)
        except StoreUnavailable as exc:
            logger.error("database unavailable, asking Pub/Sub to redeliver: {}", exc)
            return Outcome.RETRY
        except Exception as exc:
            # Whatever a request holds, it never earns a 500: Pub/Sub redelivers and an operator
            # reads the traceback.
            logger.opt(exception=exc).error("unexpected error handling a push; redelivery asked")
            return Outcome.RETRY

    async def _handle(self, body: bytes, headers: Mapping[str, str]) -> Outcome:
        try:
            message = decode_push(body, headers)
        except MalformedPush as exc:
            return await self.reject(str(exc), body, headers, exc.message_id, exc.subscription)
        # A summary, never the data itself: it holds the user's idea.
        logger.debug(
            "push message",
            message_id=message.message_id,
            subscription=message.subscription,
            delivery_attempt=message.delivery_attempt,
            data_bytes=len(message.data),
            attributes=sorted(message.attributes)[:20],
        )
        # A redelivery carries the same data as the delivery that resolved its run: no need to
        # parse and validate it again. (Other data under a known id is parsed as new.)
        known = self._message_runs.get(message.source_key) if message.source_key else None
        digest = _digest(message.data)
        if known is not None and known[1] == digest:
            return await self._execute(known[0], message, body, headers)
        try:
            job = parse_job(message)
        except MalformedPush as exc:
            return await self.reject(
                str(exc), body, headers, message.message_id, message.subscription
            )

        run_id = job.run_id
        if run_id is None:
            assert job.idea is not None and message.source_key is not None
            run, created = await self._store.run_for_message(
                message.source_key, job.idea, job.extra_context
            )
            run_id = run.id
            if created:
                logger.info(
                    "run created from a self-contained job",
                    run_id=run_id,
                    lifecycle_event="enqueued",
                    message_id=message.message_id,
                )
        outcome = await self._execute(run_id, message, body, headers)
        if outcome is not Outcome.REJECTED and message.source_key:
            self._message_runs[message.source_key] = (run_id, digest)
        return outcome

    async def _execute(
        self, run_id: str, message: PushMessage, body: bytes, headers: Mapping[str, str]
    ) -> Outcome:
        outcome = await self._runner.execute(run_id, message.delivery_attempt, message.message_id)
        if outcome is None:
            return await self.reject(
                f"unknown run_id {run_id}",
                body,
                headers,
                message.message_id,
                message.subscription,
            )
        return outcome

    async def reject(
        self,
        reason: str,
        body: bytes,
        headers: Mapping[str, str],
        message_id: str | None,
        subscription: str | None,
    ) -> Outcome:
        """Keep the whole request in quarantine and acknowledge it."""
        row_id = await self._store.quarantine(
            reason, body, quarantine_headers(headers), message_id, subscription
        )
        logger.warning(
            "push message rejected and quarantined: {}",
            reason,
            lifecycle_event="message_rejected",
            quarantine_id=row_id,
            message_id=message_id,
        )
        return Outcome.REJECTED
