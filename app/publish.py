"""Handing a submitted run to the queue: Pub/Sub, or in-process on the embedded default.

The run row is the outbox: it is committed before the publish, `published_at` is set once the
queue accepted the message, and the sweep (app/sweep.py) republishes runs left unpublished. A
message published twice is harmless: the receiver executes a run once whatever it is sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from loguru import logger

from app.errors import StoreUnavailable
from app.push.envelope import encode_wrapped
from app.push.policy import Outcome, status_for
from app.store.recovery import RecoveryStore
from app.store.runs import DEFAULT_PRIORITY, RUN_TYPE

# Bounds the API's wait on an unreachable queue; the sweep republishes later anyway.
PUBLISH_TIMEOUT_SECONDS = 5.0

IN_PROCESS_SUBSCRIPTION = "projects/local/subscriptions/in-process"


class Publisher(Protocol):
    async def publish(self, run_id: str) -> None:
        """Send the job `{run_id}` towards the push endpoint."""
        ...

    async def aclose(self) -> None: ...


class InProcessPublisher:
    """Delivers each job to the same push handler, redelivering on non-2xx like Pub/Sub would.

    Bounded: after `max_attempts` deliveries the run is left to the sweep, as Pub/Sub leaves a
    message to its dead-letter topic.
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
        logger.warning(
            "in-process delivery stopped after {} attempts; the sweep re-enqueues the run if it "
            "stays unfinished",
            self._max_attempts,
            run_id=run_id,
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


class Outbox:
    """Hands runs to the queue and records that it accepted them."""

    def __init__(self, recovery: RecoveryStore, publisher: Publisher) -> None:
        self._recovery = recovery
        self._publisher = publisher

    async def publish(self, run_id: str) -> bool:
        """Try to publish now; on failure the run stays in the outbox for the sweep."""
        try:
            await self._publisher.publish(run_id)
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
        logger.info("run published", run_id=run_id)
        return True
