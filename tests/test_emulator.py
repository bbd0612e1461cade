"""End to end with the real Pub/Sub emulator: topic -> push subscription -> app -> PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from app.store.runs import RunStore
from tests.conftest import StartApp
from tests.emulator import PROJECT, PubSubEmulator
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.procs import AppProcess, eventually


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[PubSubEmulator]:
    server = PubSubEmulator(tmp_path / "emulator.log").start()
    try:
        yield server
    finally:
        server.stop()


def start_receiver(
    start_app: StartApp, emulator: PubSubEmulator, topic: str, ack_deadline: int = 60, **env: str
) -> AppProcess:
    """An app publishing to `topic`, and the emulator's push subscription pointed at it."""
    app = start_app(PUBSUB_EMULATOR_HOST=emulator.host, PUBSUB_TOPIC=topic, **env)
    emulator.create_push_topology(topic, f"{app.url}/pubsub/push", ack_deadline)
    return app


async def run_status(client: httpx2.AsyncClient, run_id: str) -> str:
    status: str = (await client.get(f"/v1/runs/{run_id}")).json()["status"]
    return status


async def completed_count(store: RunStore) -> int:
    runs, _ = await store.list_runs(limit=100, offset=0, status="completed")
    return len(runs)


async def test_twenty_published_jobs_each_complete_exactly_once(
    emulator: PubSubEmulator, start_app: StartApp, store: RunStore, llm: FakeOpenAI
) -> None:
    start_receiver(start_app, emulator, "jobs-twenty")

    ideas = [
        json.dumps({"idea": f"Idea number {i} for a shared tool."}).encode() for i in range(20)
    ]
    emulator.publish("jobs-twenty", ideas)

    async def all_done() -> bool:
        return await completed_count(store) == 20

    await eventually(all_done, 120, "20 completed runs")
    _, total = await store.list_runs(limit=100, offset=0)
    assert total == 20
    assert len(llm.calls()) == 20 * 6
    for call_id in {c.client_request_id for c in llm.calls()}:
        assert call_id.endswith("/1"), call_id


async def test_redelivery_during_a_slow_run_does_not_run_it_twice(
    emulator: PubSubEmulator, start_app: StartApp, store: RunStore, llm: FakeOpenAI
) -> None:
    # The subscription's ack deadline (2 s) is shorter than a run (expand alone takes 5 s), so
    # the message is redelivered. The emulator holds a redelivery back while its push is
    # outstanding and sends it after the late answer (real Pub/Sub may send it meanwhile: that
    # case, a live lease and 409, is covered against PostgreSQL in test_delivery_contract).
    # The runs end 2 s apart: the first answer frees one of the emulator's two push slots while
    # the other message is outstanding past its deadline, so its redelivery goes out then. Two
    # answers at the same instant would leave no slot for it before both are acknowledged.
    llm.queue("expand", Reply(delay=5.0), Reply(delay=7.0))
    app = start_receiver(start_app, emulator, "jobs-slow", ack_deadline=2, RUN_LEASE_SECONDS="30")
    emulator.publish(
        "jobs-slow", [json.dumps({"idea": f"Slow idea {i}."}).encode() for i in (1, 2)]
    )

    async def both_done() -> bool:
        return await completed_count(store) == 2

    await eventually(both_done, 90, "2 completed runs")

    async def redelivered() -> bool:
        log = app.log()
        return "idempotent_skip" in log or "lease_busy" in log

    # The emulator sends the redelivery after the late answer, which follows the completion.
    await eventually(redelivered, 15, "the message's redelivery")
    assert len(llm.calls("expand")) == 2
    assert len(llm.calls()) == 12


async def test_garbage_message_is_acknowledged_and_quarantined_once(
    emulator: PubSubEmulator, start_app: StartApp, store: RunStore, llm: FakeOpenAI
) -> None:
    start_receiver(start_app, emulator, "jobs-garbage", ack_deadline=2)
    [message_id] = emulator.publish("jobs-garbage", [b"\x00 definitely not a job"])

    async def quarantined() -> bool:
        return len(await store.list_quarantined(10, 0)) >= 1

    await eventually(quarantined, 30, "the quarantine row")
    await asyncio.sleep(5)  # more than two ack deadlines: a redelivery would show by now
    rows = await store.list_quarantined(10, 0)
    assert len(rows) == 1
    assert rows[0].message_id == message_id
    assert rows[0].subscription == f"projects/{PROJECT}/subscriptions/jobs-garbage-sub"
    assert llm.calls() == []


async def test_api_publishes_through_the_emulator_to_the_push_endpoint(
    emulator: PubSubEmulator, start_app: StartApp, store: RunStore, llm: FakeOpenAI
) -> None:
    app = start_receiver(start_app, emulator, "jobs-api")

    async with httpx2.AsyncClient(base_url=app.url, timeout=30) as client:
        response = await client.post("/v1/full-review", json={"idea": "A repair café finder."})
        assert response.status_code == 202
        run_id = response.json()["run_id"]

        async def done() -> bool:
            return await run_status(client, run_id) == "completed"

        await eventually(done, 60, "the run to complete")
    run = await store.get_run(run_id)
    assert run is not None and run.published_at is not None
    assert len(llm.calls()) == 6


async def test_a_run_submitted_while_pubsub_is_down_is_published_later(
    tmp_path: Path, start_app: StartApp, store: RunStore, llm: FakeOpenAI
) -> None:
    emulator = PubSubEmulator(tmp_path / "emulator-outbox.log").start()
    try:
        app = start_receiver(start_app, emulator, "jobs-outbox", SWEEP_INTERVAL_SECONDS="1")
        emulator.stop()

        async with httpx2.AsyncClient(base_url=app.url, timeout=30) as client:
            response = await client.post("/v1/full-review", json={"idea": "A seed library."})
            assert response.status_code == 202
            run_id = response.json()["run_id"]
            queued = await store.get_run(run_id)
            assert queued is not None and queued.published_at is None

            emulator.start()
            emulator.create_push_topology("jobs-outbox", f"{app.url}/pubsub/push")

            async def done() -> bool:
                return await run_status(client, run_id) == "completed"

            await eventually(done, 60, "the relayed run to complete")
        assert "publish failed; the sweep will retry" in app.log()
        assert len(llm.calls("expand")) == 1
    finally:
        emulator.stop()
