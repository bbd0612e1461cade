"""Handing a submitted run to the queue: Pub/Sub, or in-process on the embedded default.

The run row is the outbox: it is committed before the publish, `published_at` is set once the
queue accepted the message, and the relay republishes runs left unpublished. A message published
twice is harmless: the receiver executes a run once whatever it is sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any, Protocol

from loguru import logger

from app.errors import StoreUnavailable
from app.push.envelope import encode_wrapped
from app.push.policy import Outcome, status_for
from app.store.runs import DEFAULT_PRIORITY, RUN_TYPE, RunStore, utcnow

# Bounds the API's wait on an unreachable queue; the outbox relay retries later anyway.
PUBLISH_TIMEOUT_SECONDS = 5.0

IN_PROCESS_SUBSCRIPTION = "projects/local/subscriptions/in-process"


class Publisher(Protocol):
    async def publish(self, run_id: str) -> None:
        """Send the job `{run_id}` towards the push endpoint."""
        ...

    async def aclose(self) -> None: ...


class InProcessPublisher:
    """Delivers each job to the same push handler, redelivering on non-2xx like Pub/Sub would.

    Bounded: after `max_attempts` deliveries the run is left as the last one left it.
    """

    def __init__(
        self,
        deliver: Callable[[bytes, Mapping[str, str]], Awaitable[Outcome]],
        max_attempts: int,
        initial_backoff: float,
        max_backoff: float = 60.0,
    ) -> None:
        self._deliver = deliver
        self._max_attempts = max_attempts
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._tasks: set[asyncio.Task[None]] = set()

    async def publish(self, run_id: str) -> None:
        task = asyncio.create_task(self._deliver_with_redelivery(run_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver_with_redelivery(self, run_id: str) -> None:
        message_id = uuid.uuid4().hex
        for attempt in range(1, self._max_attempts + 1):
            body = encode_wrapped({"run_id": run_id}, message_id, IN_PROCESS_SUBSCRIPTION, attempt)
            try:
                status = status_for(await self._deliver(body, {}))
            except Exception:
                logger.exception("in-process delivery crashed", run_id=run_id)
                status = 500
            if 200 <= status < 300:
                return
            if attempt == self._max_attempts:
                break
            delay = min(self._initial_backoff * 2 ** (attempt - 1), self._max_backoff)
            logger.info(
                "in-process delivery answered {}; redelivering in {:.1f}s",
                status,
                delay,
                run_id=run_id,
                delivery_attempt=attempt,
            )
            await asyncio.sleep(delay)
        logger.error(
            "in-process delivery gave up after {} attempts", self._max_attempts, run_id=run_id
        )

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class PubSubPublisher:
    """Publishes `{run_id, run_type, priority}` to the topic with google-cloud-pubsub."""

    def __init__(self, project_id: str, topic: str, emulator_host: str | None = None) -> None:
        if emulator_host and not os.environ.get("PUBSUB_EMULATOR_HOST"):
            # The client library reads the emulator address (and insecure channel) only here.
            os.environ["PUBSUB_EMULATOR_HOST"] = emulator_host
        from google.cloud.pubsub_v1 import PublisherClient

        self._client: Any = PublisherClient()
        self._topic: str = self._client.topic_path(project_id, topic)

    async def publish(self, run_id: str) -> None:
        data = json.dumps({"run_id": run_id, "run_type": RUN_TYPE, "priority": DEFAULT_PRIORITY})
        # publish() only enqueues into a batch; the returned future resolves on a client thread.
        future = await asyncio.to_thread(
            self._client.publish,
            self._topic,
            data.encode(),
            timeout=PUBLISH_TIMEOUT_SECONDS,
            run_id=run_id,
        )
        await asyncio.wait_for(asyncio.wrap_future(future), PUBLISH_TIMEOUT_SECONDS)

    async def aclose(self) -> None:
        await asyncio.to_thread(self._client.stop)


class OutboxRelay:
    """Publishes new runs, and republishes every `interval` those whose publish failed."""

    def __init__(self, store: RunStore, publisher: Publisher, interval: float) -> None:
        self._store = store
        self._publisher = publisher
        self._interval = interval

    async def publish(self, run_id: str) -> bool:
        """Try to publish now; on failure the run stays in the outbox for the relay."""
        try:
            await self._publisher.publish(run_id)
        except Exception as exc:  # any client failure leaves the run for the relay
            logger.warning(
                "publish failed; the outbox relay will retry: {}",
                exc.__class__.__name__,
                run_id=run_id,
            )
            return False
        try:
            await self._store.mark_published(run_id)
        except StoreUnavailable:
            # Published but not marked: the relay publishes it again, which is harmless.
            logger.warning("could not mark run published", run_id=run_id)
        logger.info("run published", run_id=run_id)
        return True

    async def relay_once(self) -> int:
        """Publish runs left unpublished for longer than one interval; returns how many."""
        cutoff = utcnow() - timedelta(seconds=self._interval)
        published = 0
        for run_id in await self._store.unpublished_run_ids(cutoff, limit=100):
            if not await self.publish(run_id):
                break  # the queue is still unreachable; try again next round
            published += 1
        return published

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                count = await self.relay_once()
            except Exception:
                logger.exception("outbox relay round failed")
                continue
            if count:
                logger.info("outbox relay published {} run(s)", count)
