"""Handing a submitted run to the push receiver: in-process on the embedded default."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from loguru import logger

from app.push.envelope import encode_wrapped
from app.push.policy import Outcome, status_for

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
