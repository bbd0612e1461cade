"""Handing a submitted run to the queue: Pub/Sub, or in-process on the embedded default.

The run row is the outbox: it is committed before the publish, `published_at` is set once the
queue accepted the message, and the sweep (app/sweep.py) republishes runs left unpublished. A
message published twice is harmless: the receiver executes a run once whatever it is sent.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

from loguru import logger
from opentelemetry import trace

from app.domain.models import Priority, RunType
from app.errors import StoreUnavailable
from app.push.envelope import encode_wrapped
from app.push.policy import Outcome, status_for
from app.store.recovery import RecoveryStore
from app.tracing import delivering, publishing

# Bounds the API's wait on an unreachable queue; the sweep republishes later anyway.
PUBLISH_TIMEOUT_SECONDS = 5.0

IN_PROCESS_SUBSCRIPTION = "projects/local/subscriptions/in-process"
# Jobs waiting for an in-process delivery; past it a publish fails and the sweep retries it.
IN_PROCESS_MAX_WAITING = 10_000
# Order of the in-process queue: lower first.
_RANK: dict[Priority, int] = {"high": 0, "normal": 1}


@dataclass(frozen=True)
class QueuedJob:
    """A run handed to the queue; its fields are the job message (the reference's shape)."""

    run_id: str
    run_type: RunType
    priority: Priority

    def message(self) -> dict[str, str]:
        """`{run_id, run_type, priority}`, the data of the Pub/Sub message."""
        return asdict(self)


class Publisher(Protocol):
    async def publish(self, job: QueuedJob) -> None:
        """Send `job` towards the push endpoint; raises when the queue did not accept it."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class _Message:
    """One published job as the in-process queue delivers it, attempt after attempt."""

    job: QueuedJob
    message_id: str
    attempt: int = 1
    # The publisher's trace context (app/tracing.py), as Pub/Sub would carry it.
    attributes: dict[str, str] = field(default_factory=dict)


class InProcessPublisher:
    """Delivers jobs to the same push handler, as Pub/Sub would, high priority first.

    Jobs wait in a priority queue: high before normal, first published first within a
    priority. At most `max_in_flight` deliveries run at once (WORKER_MAX_CONCURRENCY, the
    runner's own limit), so when more jobs wait than can run, the next free slot goes to the
    oldest high-priority job. A job already waiting is not queued twice. A non-2xx answer puts
    the job back after a backoff, like Pub/Sub's redelivery; after `max_attempts` deliveries
    the run is left to the sweep, as Pub/Sub leaves a message to its dead-letter topic.
    """

    def __init__(
        self,
        deliver: Callable[[bytes, Mapping[str, str]], Awaitable[Outcome]],
        max_attempts: int,
        initial_backoff: float,
        max_in_flight: int,
        max_backoff: float = 60.0,
        max_waiting: int = IN_PROCESS_MAX_WAITING,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._deliver = deliver
        self._tracer = tracer or trace.NoOpTracer()
        self._max_attempts = max_attempts
        self._initial_backoff = initial_backoff
        self._max_in_flight = max_in_flight
        self._max_backoff = max_backoff
        self._max_waiting = max_waiting
        self._waiting: list[tuple[int, int, _Message]] = []  # a heap: (rank, order, message)
        self._waiting_runs: set[str] = set()
        self._order = itertools.count()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._backing_off: set[asyncio.Task[None]] = set()
        self._closed = False

    async def publish(self, job: QueuedJob) -> None:
        if self._closed:
            raise RuntimeError("the in-process queue is closed")
        if job.run_id in self._waiting_runs:
            return  # one waiting message executes the run
        if len(self._waiting) >= self._max_waiting:
            raise RuntimeError(f"{self._max_waiting} jobs already wait for an in-process delivery")
        message_id = uuid.uuid4().hex
        with publishing(self._tracer, "in-process", job.run_id) as (span, attributes):
            span.set_attribute("messaging.message.id", message_id)
            self._enqueue(_Message(job, message_id, attributes=attributes))

    def _enqueue(self, message: _Message) -> None:
        rank = _RANK[message.job.priority]
        heapq.heappush(self._waiting, (rank, next(self._order), message))
        self._waiting_runs.add(message.job.run_id)
        self._dispatch()

    def _dispatch(self) -> None:
        """Start deliveries from the head of the queue while fewer than the limit run."""
        while self._waiting and len(self._in_flight) < self._max_in_flight and not self._closed:
            _, _, message = heapq.heappop(self._waiting)
            self._waiting_runs.discard(message.job.run_id)
            task = asyncio.create_task(self._deliver_once(message))
            self._in_flight.add(task)
            task.add_done_callback(self._delivered)

    def _delivered(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._dispatch()

    async def _deliver_once(self, message: _Message) -> None:
        run_id, attempt = message.job.run_id, message.attempt
        body = encode_wrapped(
            message.job.message(),
            message.message_id,
            IN_PROCESS_SUBSCRIPTION,
            attempt,
            attributes=message.attributes,
        )
        try:
            # No flush here, unlike a push over HTTP: this queue runs on the embedded default,
            # never on a Cloud Run instance whose CPU is throttled between requests.
            with delivering(self._tracer, message.attributes, "deliver in-process"):
                status = status_for(await self._deliver(body, {}))
        except Exception:
            logger.exception("in-process delivery crashed", run_id=run_id)
            status = 500
        if 200 <= status < 300 or self._closed:
            return
        if attempt >= self._max_attempts:
            logger.warning(
                "in-process delivery stopped after {} attempts; the sweep re-enqueues the run "
                "if it stays unfinished",
                self._max_attempts,
                run_id=run_id,
            )
            return
        delay = min(self._initial_backoff * 2 ** (attempt - 1), self._max_backoff)
        logger.info(
            "in-process delivery answered {}; redelivering in {:.1f}s",
            status,
            delay,
            run_id=run_id,
            delivery_attempt=attempt,
        )
        # The wait holds no delivery slot: other jobs run meanwhile.
        retry = asyncio.create_task(self._redeliver(delay, replace(message, attempt=attempt + 1)))
        self._backing_off.add(retry)
        retry.add_done_callback(self._backing_off.discard)

    async def _redeliver(self, delay: float, message: _Message) -> None:
        await asyncio.sleep(delay)
        if message.job.run_id not in self._waiting_runs:  # else that message executes it
            self._enqueue(message)

    async def aclose(self) -> None:
        """Drop waiting jobs (the sweep re-enqueues unfinished runs) and cancel the rest."""
        self._closed = True
        self._waiting.clear()
        self._waiting_runs.clear()
        tasks = [*self._in_flight, *self._backing_off]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class PubSubPublisher:
    """Publishes `{run_id, run_type, priority}` with google-cloud-pubsub; priority=high jobs
    go to their own topic, whose push subscription has its own backlog."""

    def __init__(
        self,
        project_id: str,
        topic: str,
        high_priority_topic: str,
        emulator_host: str | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self._tracer = tracer or trace.NoOpTracer()
        if emulator_host and not os.environ.get("PUBSUB_EMULATOR_HOST"):
            # The client library reads the emulator address (and insecure channel) only here.
            os.environ["PUBSUB_EMULATOR_HOST"] = emulator_host
        from google.cloud.pubsub_v1 import PublisherClient

        self._client: Any = PublisherClient()
        self._topics: dict[Priority, str] = {
            "normal": self._client.topic_path(project_id, topic),
            "high": self._client.topic_path(project_id, high_priority_topic),
        }

    async def publish(self, job: QueuedJob) -> None:
        from google.api_core.exceptions import NotFound, PermissionDenied

        try:
            await self._publish(self._topics[job.priority], job)
        except (NotFound, PermissionDenied) as exc:
            if job.priority == "normal":
                raise
            # A missing high-priority topic (set-up not re-run) must not strand the run.
            logger.error(
                "cannot publish to the high-priority topic {} ({}); published to {} instead: "
                "run scripts/setup_gcp.sh",
                self._topics["high"],
                exc.__class__.__name__,
                self._topics["normal"],
                run_id=job.run_id,
            )
            await self._publish(self._topics["normal"], job)

    async def _publish(self, topic: str, job: QueuedJob) -> None:
        data = json.dumps(job.message()).encode()
        with publishing(self._tracer, topic.rsplit("/", 1)[-1], job.run_id) as (span, attributes):
            # publish() only enqueues into a batch; the returned future resolves on a client
            # thread.
            future = await asyncio.to_thread(
                self._client.publish,
                topic,
                data,
                timeout=PUBLISH_TIMEOUT_SECONDS,
                run_id=job.run_id,
                **attributes,
            )
            message_id = await asyncio.wait_for(
                asyncio.wrap_future(future), PUBLISH_TIMEOUT_SECONDS
            )
            span.set_attribute("messaging.message.id", str(message_id))

    async def aclose(self) -> None:
        await asyncio.to_thread(self._client.stop)


class Outbox:
    """Hands runs to the queue and records that it accepted them."""

    def __init__(self, recovery: RecoveryStore, publisher: Publisher) -> None:
        self._recovery = recovery
        self._publisher = publisher

    async def publish(self, job: QueuedJob) -> bool:
        """Try to publish now; on failure the run stays in the outbox for the sweep."""
        run_id = job.run_id
        try:
            await self._publisher.publish(job)
        except Exception as exc:  # any client failure leaves the run for the sweep
            logger.warning(
                "publish failed; the sweep will retry: {}", exc.__class__.__name__, run_id=run_id
            )
            return False
        try:
            await self._recovery.mark_published(run_id)
        except StoreUnavailable:
            # Published but not marked: the sweep publishes it again, which is harmless.
            logger.warning("could not mark run published", run_id=run_id)
        logger.info("run published", run_id=run_id, priority=job.priority)
        return True
