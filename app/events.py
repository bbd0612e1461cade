"""Live run events for the streams this process serves (`GET /v1/runs/{run_id}/events`).

A run executes on whichever instance Pub/Sub pushed it to, rarely the one a browser is connected
to. On PostgreSQL, migration 0006's trigger NOTIFYs every event as its transaction commits, and
one connection per process LISTENs while at least one stream is open. On the embedded SQLite
default the process is the only writer, so its repositories announce their committed events here
instead. Either way a stream waits on an in-memory queue: no query per connected client, except
to read what it missed (on connecting, and when the listener reconnected or its queue overflowed).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Iterator, Sequence
from typing import Any

from loguru import logger
from sqlalchemy.ext.asyncio import AsyncEngine

from app.store.events import EventStore, RunEvent

CHANNEL = "run_events"
# Events a stream may fall behind by before it reads from the database instead.
QUEUE_SIZE = 256
# A database that hangs (rather than closing the connection) is noticed by a probe this often.
PROBE_INTERVAL_SECONDS = 30.0
PROBE_TIMEOUT_SECONDS = 10.0
RECONNECT_INITIAL_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 30.0


class Signal(enum.Enum):
    """What a stream may receive besides an event."""

    # Read what was committed after the last event sent: some may not have arrived live.
    RESYNC = "resync"
    # The process is shutting down: end the stream (the client reconnects elsewhere).
    CLOSED = "closed"


class Subscription:
    """One stream's view of one run's events."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._queue: asyncio.Queue[RunEvent | Signal] = asyncio.Queue(QUEUE_SIZE)

    def put(self, item: RunEvent | Signal) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            # A stream that cannot keep up reads what it missed from the database instead.
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(Signal.RESYNC)

    async def get(self, within: float) -> RunEvent | Signal | None:
        """The next event or signal; None when `within` seconds passed without one."""
        try:
            return await asyncio.wait_for(self._queue.get(), within)
        except TimeoutError:
            return None


class RunEvents:
    """Fans run events out to the subscriptions of this process.

    `listener_engine` (PostgreSQL only; a pool-less engine, so the listening connection is its
    own and never taken from the work's pool) makes it LISTEN; without it, events arrive
    through `announce`.
    """

    def __init__(self, store: EventStore, listener_engine: AsyncEngine | None = None) -> None:
        self._store = store
        self._listener_engine = listener_engine
        self._subscriptions: dict[str, set[Subscription]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._closing = False

    async def backlog(self, run_id: str, after: int) -> tuple[str | None, Sequence[RunEvent]]:
        """The run's status (None: no such run) and its events numbered above `after`."""
        return await self._store.backlog(run_id, after)

    @contextlib.contextmanager
    def subscribe(self, run_id: str) -> Iterator[Subscription]:
        """Receive the run's events while inside; subscribe before reading the backlog, so
        nothing committed in between is lost (what arrives twice is told apart by number)."""
        subscription = Subscription(run_id)
        if self._closing:
            subscription.put(Signal.CLOSED)
        self._subscriptions.setdefault(run_id, set()).add(subscription)
        self._start_listening()
        try:
            yield subscription
        finally:
            subscribers = self._subscriptions.get(run_id)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._subscriptions[run_id]
            if not self._subscriptions:
                self._stop_listening()

    def announce(self, events: Sequence[RunEvent]) -> None:
        """Events a transaction of this process committed (the repositories' `announce`)."""
        if self._listener_engine is not None:
            # PostgreSQL's NOTIFY brings every instance's events, this one's included.
            return
        for event in events:
            self._deliver(event)

    def close_streams(self) -> None:
        """End every stream (shutdown: Cloud Run gives 10 s, and open streams would hold the
        server's graceful exit until they end)."""
        self._closing = True
        for subscribers in self._subscriptions.values():
            for subscription in subscribers:
                subscription.put(Signal.CLOSED)

    async def aclose(self) -> None:
        self.close_streams()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        if self._listener_engine is not None:
            await self._listener_engine.dispose()

    def _deliver(self, event: RunEvent) -> None:
        for subscription in self._subscriptions.get(event.run_id, ()):
            subscription.put(event)

    def _resync_all(self) -> None:
        for subscribers in self._subscriptions.values():
            for subscription in subscribers:
                subscription.put(Signal.RESYNC)

    def _start_listening(self) -> None:
        if self._listener_engine is None or self._closing:
            return
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen_forever(self._listener_engine))

    def _stop_listening(self) -> None:
        # Nobody is watching: no connection held, and on Cloud Run no idle listener whose
        # unread notifications would hold back PostgreSQL's queue while its CPU is throttled.
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()

    async def _listen_forever(self, engine: AsyncEngine) -> None:
        delay = RECONNECT_INITIAL_SECONDS
        while True:
            try:
                await self._listen(engine)
            except Exception as exc:  # whatever the driver raises, the answer is: reconnect
                reason = type(exc).__name__
            else:
                reason = "connection closed"
            logger.warning(
                "run events: listening connection lost ({}); reconnecting in {:.1f} s",
                reason,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_SECONDS)

    async def _listen(self, engine: AsyncEngine) -> None:
        """LISTEN until the connection is lost or stops answering."""
        async with engine.connect() as connection:
            raw = await connection.get_raw_connection()
            driver: Any = raw.driver_connection
            lost = asyncio.Event()
            driver.add_termination_listener(lambda _connection: lost.set())
            await driver.add_listener(CHANNEL, self._on_notification)
            logger.info("run events: listening on {}", CHANNEL)
            # Whatever committed before LISTEN took effect is read from the table.
            self._resync_all()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), PROBE_INTERVAL_SECONDS)
                if not lost.is_set():
                    await asyncio.wait_for(driver.fetchval("SELECT 1"), PROBE_TIMEOUT_SECONDS)

    def _on_notification(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        if not self._subscriptions:
            return
        try:
            event = RunEvent.from_notification(payload)
        except (ValueError, KeyError, TypeError):
            logger.warning("run events: ignoring a notification that is not a run event")
            return
        self._deliver(event)
