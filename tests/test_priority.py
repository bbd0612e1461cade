"""Priority routing: high-priority jobs travel on their own topic and go first in-process."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.domain.models import Priority
from app.publish import IN_PROCESS_SUBSCRIPTION, InProcessPublisher, QueuedJob
from app.push.policy import Outcome
from app.settings import Settings
from app.store.recovery import RecoveryStore, RunJob
from app.store.runs import RunStore
from app.store.tables import Run
from tests.conftest import StartApp, running_app, services_of
from tests.emulator import PROJECT, PubSubEmulator
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.procs import eventually

# --- the in-process queue, against a recording push handler -----------------------------------


class Handler:
    """Stands in for the push handler: records each envelope, answers from a script, and can
    hold deliveries until released."""

    def __init__(self, outcomes: Mapping[str, list[Outcome]] | None = None) -> None:
        self.delivered: list[dict[str, Any]] = []  # the job and envelope of each delivery
        self.outcomes = {run: list(script) for run, script in (outcomes or {}).items()}
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0
        self.most_in_flight = 0

    async def __call__(self, body: bytes, headers: Mapping[str, str]) -> Outcome:
        envelope = json.loads(body)
        job = json.loads(base64.b64decode(envelope["message"]["data"]))
        self.delivered.append({**job, "envelope": envelope})
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        script = self.outcomes.get(job["run_id"])
        return script.pop(0) if script else Outcome.COMPLETED

    def order(self) -> list[str]:
        return [d["run_id"] for d in self.delivered]


def job(run_id: str, priority: Priority = "normal") -> QueuedJob:
    return QueuedJob(run_id, "initial", priority)


def publisher(handler: Handler, max_in_flight: int = 1, **kw: Any) -> InProcessPublisher:
    values: dict[str, Any] = {"max_attempts": 3, "initial_backoff": 0.01, **kw}
    return InProcessPublisher(handler, max_in_flight=max_in_flight, **values)


async def settle(handler: Handler, count: int) -> None:
    async def delivered() -> bool:
        return len(handler.delivered) >= count

    await eventually(delivered, 5, f"{count} deliveries")


async def test_high_priority_jobs_are_delivered_first_and_fifo_within_a_priority() -> None:
    handler = Handler()
    handler.gate.clear()  # the first delivery holds the only slot while the rest queue
    queue = publisher(handler, max_in_flight=1)
    try:
        for item in [
            job("n1"),
            job("n2"),
            job("h1", "high"),
            job("n3"),
            job("h2", "high"),
        ]:
            await queue.publish(item)
        await settle(handler, 1)
        handler.gate.set()
        await settle(handler, 5)
    finally:
        await queue.aclose()
    assert handler.order() == ["n1", "h1", "h2", "n2", "n3"]
    assert handler.most_in_flight == 1


async def test_deliveries_in_flight_are_bounded() -> None:
    handler = Handler()
    handler.gate.clear()
    queue = publisher(handler, max_in_flight=3)
    try:
        for i in range(10):
            await queue.publish(job(f"r{i}"))
        await settle(handler, 3)
        await asyncio.sleep(0.05)
        assert len(handler.delivered) == 3  # the other seven wait
        handler.gate.set()
        await settle(handler, 10)
    finally:
        await queue.aclose()
    assert handler.most_in_flight == 3


async def test_the_envelope_carries_the_job_and_a_redelivery_keeps_its_message_id() -> None:
    handler = Handler({"r": [Outcome.RETRY, Outcome.OVERLOADED]})
    queue = publisher(handler, max_in_flight=1)
    try:
        await queue.publish(job("r", "high"))
        await settle(handler, 3)
    finally:
        await queue.aclose()
    jobs = [{k: v for k, v in d.items() if k != "envelope"} for d in handler.delivered]
    assert jobs == [{"run_id": "r", "run_type": "initial", "priority": "high"}] * 3
    envelopes = [d["envelope"] for d in handler.delivered]
    assert [e["deliveryAttempt"] for e in envelopes] == [1, 2, 3]
    assert len({e["message"]["messageId"] for e in envelopes}) == 1
    assert {e["subscription"] for e in envelopes} == {IN_PROCESS_SUBSCRIPTION}


async def test_redelivery_stops_after_max_attempts() -> None:
    handler = Handler({"r": [Outcome.RETRY] * 10})
    queue = publisher(handler, max_in_flight=1, max_attempts=3)
    try:
        await queue.publish(job("r"))
        await settle(handler, 3)
        await asyncio.sleep(0.2)  # far beyond the backoff: a fourth attempt would show
    finally:
        await queue.aclose()
    assert handler.order() == ["r"] * 3


async def test_a_job_backing_off_holds_no_delivery_slot() -> None:
    handler = Handler({"slow-to-succeed": [Outcome.RETRY]})
    queue = publisher(handler, max_in_flight=1, initial_backoff=0.3)
    try:
        await queue.publish(job("slow-to-succeed"))
        await queue.publish(job("other"))
        await settle(handler, 3)
    finally:
        await queue.aclose()
    # "other" ran while the first job waited out its backoff.
    assert handler.order() == ["slow-to-succeed", "other", "slow-to-succeed"]


async def test_a_job_already_waiting_is_not_queued_twice() -> None:
    handler = Handler()
    handler.gate.clear()
    queue = publisher(handler, max_in_flight=1)
    try:
        await queue.publish(job("first"))
        await settle(handler, 1)
        await queue.publish(job("again"))
        await queue.publish(job("again"))
        handler.gate.set()
        await settle(handler, 2)
        await asyncio.sleep(0.05)
    finally:
        await queue.aclose()
    assert handler.order() == ["first", "again"]


async def test_the_waiting_queue_is_bounded_and_aclose_stops_everything() -> None:
    handler = Handler({"backing-off": [Outcome.RETRY]})
    queue = publisher(handler, max_in_flight=1, max_waiting=2, initial_backoff=30)
    await queue.publish(job("backing-off"))
    await settle(handler, 1)
    handler.gate.clear()
    await queue.publish(job("held"))
    await settle(handler, 2)
    await queue.publish(job("w1"))
    await queue.publish(job("w2"))
    with pytest.raises(RuntimeError, match="already wait"):
        await queue.publish(job("w3"))

    # One delivery held, one redelivery backing off, two waiting: all stop now.
    await asyncio.wait_for(queue.aclose(), 2)
    assert handler.in_flight == 0
    with pytest.raises(RuntimeError, match="closed"):
        await queue.publish(job("late"))
    handler.gate.set()
    await asyncio.sleep(0.05)
    assert handler.order() == ["backing-off", "held"]


# --- the embedded default: a high run overtakes queued normal runs -----------------------------


async def set_priority(engine: AsyncEngine, run_id: str, priority: Priority) -> None:
    async with engine.begin() as connection:
        await connection.execute(update(Run).where(Run.id == run_id).values(priority=priority))


async def test_embedded_runs_a_later_high_priority_run_before_queued_normal_ones(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    # One run at a time; the first one is slow, so the others queue behind it.
    llm.queue("expand", Reply(delay=1.5))
    async with running_app(make_settings(worker_max_concurrency=1)) as (app, _):
        services = services_of(app)
        ids = [
            (await services.store.create_run(f"Idea {name} for a tool library.", None)).id
            for name in ("slow", "n1", "n2", "n3", "high")
        ]
        slow, n1, n2, n3, high = ids
        await set_priority(services.engine, high, "high")
        for run_id in ids:  # the high-priority run is published last
            priority: Priority = "high" if run_id == high else "normal"
            assert await services.outbox.publish(QueuedJob(run_id, "initial", priority))

        async def all_completed() -> bool:
            for run_id in ids:
                run = await services.store.get_run(run_id)
                if run is None or run.status != "completed":
                    return False
            return True

        await eventually(all_completed, 60, "five completed runs")
        started = []
        for run_id in (slow, high, n1, n2, n3):
            run = await services.store.get_run(run_id)
            assert run is not None and run.started_at is not None
            started.append(run.started_at)

    expand_order = [call.client_request_id.split("/")[0] for call in llm.calls("expand")]
    assert expand_order == [slow, high, n1, n2, n3]
    assert started == sorted(started)


# --- Pub/Sub: the high topic and its own push subscription, through the real emulator ---------


class RecordingForwarder:
    """A loopback HTTP server between the emulator and the app: records each push envelope's
    subscription and job, then forwards the request to the app and answers with its status."""

    def __init__(self) -> None:
        self.target = ""
        self.received: list[tuple[str, dict[str, Any]]] = []
        forwarder = self

        class Forward(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                envelope = json.loads(body)
                data = json.loads(base64.b64decode(envelope["message"]["data"]))
                forwarder.received.append((envelope["subscription"], data))
                answer = httpx2.post(
                    forwarder.target,
                    content=body,
                    headers={"content-type": "application/json"},
                    timeout=60,
                )
                self.send_response(answer.status_code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}/pubsub/push"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def subscriptions_of(self, run_id: str) -> set[str]:
        return {sub for sub, data in self.received if data.get("run_id") == run_id}


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[PubSubEmulator]:
    server = PubSubEmulator(tmp_path / "emulator.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def forwarder() -> Iterator[RecordingForwarder]:
    server = RecordingForwarder()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(pg_url)
    try:
        yield engine
    finally:
        await engine.dispose()


async def submit_unpublished(store: RunStore, engine: AsyncEngine, priority: Priority) -> str:
    """A run as the API leaves it when its publish failed: the sweep publishes it by id."""
    run = await store.create_run(f"A {priority}-priority idea for a shared workshop.", None)
    async with engine.begin() as connection:
        # Priority and age in one statement, so the sweep never sees one without the other.
        await connection.execute(
            update(Run)
            .where(Run.id == run.id)
            .values(priority=priority, created_at=run.created_at - timedelta(minutes=1))
        )
    return run.id


async def test_the_recovery_queries_give_each_run_its_type_and_priority(
    store: RunStore, engine: AsyncEngine
) -> None:
    """The sweep, the dead-letter receiver and the start-up pick-up republish by these."""
    recovery = RecoveryStore(engine)
    unpublished = await submit_unpublished(store, engine, "high")
    stale = await store.create_run("A stale idea for a tool library.", None)
    async with engine.begin() as connection:
        await connection.execute(
            update(Run)
            .where(Run.id == stale.id)
            .values(
                priority="high",
                published_at=stale.created_at,
                updated_at=stale.updated_at - timedelta(hours=1),
            )
        )
    plain = (await store.create_run("A plain idea for a tool library.", None)).id

    assert await recovery.unpublished_runs(30, 10) == [RunJob(unpublished, "initial", "high")]
    assert await recovery.take_stale(60, 10) == [RunJob(stale.id, "initial", "high")]
    assert set(await recovery.unfinished_runs(10)) == {
        RunJob(unpublished, "initial", "high"),
        RunJob(stale.id, "initial", "high"),
        RunJob(plain, "initial", "normal"),
    }
    state = await recovery.run_state(stale.id)
    assert state is not None and state.job == RunJob(stale.id, "initial", "high")


def subscription(name: str) -> str:
    return f"projects/{PROJECT}/subscriptions/{name}"


async def wait_completed(store: RunStore, *run_ids: str) -> None:
    async def done() -> bool:
        for run_id in run_ids:
            run = await store.get_run(run_id)
            if run is None or run.status != "completed":
                return False
        return True

    await eventually(done, 60, f"runs {run_ids} to complete")


async def test_high_priority_runs_reach_the_receiver_through_their_own_subscription(
    emulator: PubSubEmulator,
    forwarder: RecordingForwarder,
    start_app: StartApp,
    store: RunStore,
    engine: AsyncEngine,
    llm: FakeOpenAI,
) -> None:
    # The app's sweep publishes both runs by id, with the PubSubPublisher main.py builds.
    app = start_app(
        PUBSUB_EMULATOR_HOST=emulator.host, PUBSUB_TOPIC="jobs-prio", SWEEP_INTERVAL_SECONDS="1"
    )
    forwarder.target = f"{app.url}/pubsub/push"
    emulator.create_push_topology("jobs-prio", forwarder.url)
    # PUBSUB_HIGH_PRIORITY_TOPIC is unset: PUBSUB_TOPIC + "-high".
    emulator.create_push_topology("jobs-prio-high", forwarder.url)

    normal = await submit_unpublished(store, engine, "normal")
    high = await submit_unpublished(store, engine, "high")
    await wait_completed(store, normal, high)

    assert forwarder.subscriptions_of(high) == {subscription("jobs-prio-high-sub")}
    assert forwarder.subscriptions_of(normal) == {subscription("jobs-prio-sub")}
    jobs = sorted((data for _, data in forwarder.received), key=lambda d: d["priority"])
    assert jobs == [
        {"run_id": high, "run_type": "initial", "priority": "high"},
        {"run_id": normal, "run_type": "initial", "priority": "normal"},
    ]
    assert len(llm.calls("expand")) == 2


async def test_a_missing_high_priority_topic_falls_back_to_the_jobs_topic(
    emulator: PubSubEmulator,
    forwarder: RecordingForwarder,
    start_app: StartApp,
    store: RunStore,
    engine: AsyncEngine,
    llm: FakeOpenAI,
) -> None:
    app = start_app(
        PUBSUB_EMULATOR_HOST=emulator.host,
        PUBSUB_TOPIC="jobs-nohigh",
        PUBSUB_HIGH_PRIORITY_TOPIC="jobs-nohigh-urgent",  # never created
        SWEEP_INTERVAL_SECONDS="1",
    )
    forwarder.target = f"{app.url}/pubsub/push"
    emulator.create_push_topology("jobs-nohigh", forwarder.url)

    high = await submit_unpublished(store, engine, "high")
    await wait_completed(store, high)

    assert forwarder.subscriptions_of(high) == {subscription("jobs-nohigh-sub")}
    assert "cannot publish to the high-priority topic" in app.log()
    assert "jobs-nohigh-urgent" in app.log()
