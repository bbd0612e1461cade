"""The push delivery contract (SPEC §3.4, §3.5): ack policy rows, leases, deadlines, attempts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI
from loguru import logger
from sqlalchemy import update

from app.push.envelope import encode_wrapped
from app.push.policy import ACK_POLICY, Outcome, status_for
from app.settings import Settings
from app.store.runs import utcnow
from app.store.tables import Run
from tests.conftest import running_app, services_of
from tests.fakes.openai_server import USAGE, FakeOpenAI, Reply
from tests.fakes.tcp_proxy import TcpProxy
from tests.test_push_pipeline import SUBSCRIPTION, new_run, push, run_json

AppClient = tuple[FastAPI, httpx2.AsyncClient]


@contextmanager
def lifecycle_events() -> Iterator[list[str]]:
    """Collect the `lifecycle_event` of every log line written inside the block."""
    events: list[str] = []
    sink = logger.add(
        lambda m: events.append(m.record["extra"].get("lifecycle_event", "")), level="DEBUG"
    )
    try:
        yield events
    finally:
        logger.remove(sink)


async def set_run(app: FastAPI, run_id: str, **values: Any) -> None:
    """Put a run into a state a test needs (a lease held elsewhere, an old start time)."""
    engine = services_of(app).engine
    async with engine.begin() as connection:
        await connection.execute(update(Run).where(Run.id == run_id).values(**values))


@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        (Outcome.COMPLETED, 204),
        (Outcome.ALREADY_DONE, 204),
        (Outcome.LEASE_BUSY, 409),
        (Outcome.REJECTED, 204),
        (Outcome.RETRY, 503),
        (Outcome.FAILED, 204),
        (Outcome.OVERLOADED, 503),
        (Outcome.SHUTTING_DOWN, 503),
    ],
)
def test_ack_policy_table(outcome: Outcome, status: int) -> None:
    assert status_for(outcome) == status


def test_ack_policy_covers_every_outcome() -> None:
    assert set(ACK_POLICY) == set(Outcome)


async def test_duplicate_of_completed_run_logs_idempotent_skip(app_client: AppClient) -> None:
    app, client = app_client
    run_id = await new_run(app)
    assert (await push(client, {"run_id": run_id})).status_code == 204
    before = await run_json(client, run_id)
    with lifecycle_events() as events:
        assert (await push(client, {"run_id": run_id})).status_code == 204
    assert "idempotent_skip" in events
    assert await run_json(client, run_id) == before


async def test_live_lease_elsewhere_answers_409_and_leaves_the_run(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    app, client = app_client
    run_id = await new_run(app)
    await set_run(
        app,
        run_id,
        status="running",
        lease_owner="other-instance/1",
        lease_expires_at=utcnow() + timedelta(seconds=60),
        started_at=utcnow(),
    )
    with lifecycle_events() as events:
        response = await push(client, {"run_id": run_id})
    assert response.status_code == 409
    assert response.json()["code"] == "lease_busy"
    assert "lease_busy" in events
    run = await run_json(client, run_id)
    assert run["lease_owner"] == "other-instance/1"
    assert llm.calls() == []


async def test_expired_lease_is_taken_over(app_client: AppClient, llm: FakeOpenAI) -> None:
    app, client = app_client
    run_id = await new_run(app)
    await set_run(
        app,
        run_id,
        status="running",
        lease_owner="dead-instance/1",
        lease_expires_at=utcnow() - timedelta(seconds=1),
        started_at=utcnow(),
    )
    assert (await push(client, {"run_id": run_id})).status_code == 204
    run = await run_json(client, run_id)
    assert run["status"] == "completed"
    assert run["lease_owner"] is None


@pytest.mark.parametrize("form", ["run_id", "idea"])
async def test_ten_concurrent_duplicate_deliveries_execute_once(
    app_client: AppClient, llm: FakeOpenAI, form: str
) -> None:
    app, client = app_client
    for step in ("expand", "review_architect", "review_critic"):
        llm.step_delay[step] = 0.3
    job: dict[str, Any] = (
        {"run_id": await new_run(app)} if form == "run_id" else {"idea": "A shared bike fleet."}
    )
    body = encode_wrapped(job, "dup-message-1", SUBSCRIPTION)

    responses = await asyncio.gather(
        *(client.post("/pubsub/push", content=body) for _ in range(10))
    )

    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {204, 409}, statuses
    assert 204 in statuses
    assert len(llm.calls()) == 6
    listing = (await client.get("/v1/runs")).json()
    assert listing["total"] == 1
    run = await run_json(client, listing["runs"][0]["run_id"])
    assert run["status"] == "completed"
    assert len(run["persona_reviews"]) == 5
    assert all(step["attempts"] == 1 for step in run["step_progress"])
    assert run["usage"]["total_tokens"] == 6 * USAGE["total_tokens"]

    # Redeliveries after completion are acknowledged without any further LLM call.
    again = await asyncio.gather(*(client.post("/pubsub/push", content=body) for _ in range(3)))
    assert [r.status_code for r in again] == [204, 204, 204]
    assert len(llm.calls()) == 6


async def test_run_with_invalid_input_fails_permanently(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    app, client = app_client
    run_id = await new_run(app)
    await set_run(app, run_id, input_idea="One. " * 11)
    assert (await push(client, {"run_id": run_id})).status_code == 204
    run = await run_json(client, run_id)
    assert run["status"] == "failed"
    assert "run input is invalid" in run["error_message"]
    assert llm.calls() == []


async def test_push_deadline_checkpoints_and_answers_503(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    settings = make_settings(push_deadline_seconds=1.0)
    for persona in ("architect", "critic", "optimist", "security_guardian", "user_advocate"):
        llm.step_delay[f"review_{persona}"] = 10.0
    async with running_app(settings) as (app, client):
        run_id = await new_run(app)
        started = time.monotonic()
        response = await push(client, {"run_id": run_id})
        elapsed = time.monotonic() - started
        assert response.status_code == 503
        assert elapsed < 5, "the delivery waited for the LLM instead of its deadline"
        run = await run_json(client, run_id)
        assert run["lease_owner"] is None
        assert run["proposal"] is not None
        assert "deadline" in run["error_message"]

        llm.step_delay.clear()
        assert (await push(client, {"run_id": run_id})).status_code == 204
        assert len(llm.calls("expand")) == 1
        assert (await run_json(client, run_id))["status"] == "completed"


async def test_step_timeout_cancels_a_hung_call_and_retries(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    llm.queue("review_critic", Reply(delay=10.0))
    async with running_app(make_settings(worker_step_timeout_seconds=0.5)) as (app, client):
        run_id = await new_run(app)
        started = time.monotonic()
        assert (await push(client, {"run_id": run_id})).status_code == 204
        assert time.monotonic() - started < 5, "the hung call was not cancelled"
        run = await run_json(client, run_id)
        critic = next(s for s in run["step_progress"] if s["step_name"] == "review_critic")
        assert critic["attempts"] == 2
        assert critic["status"] == "completed"


async def test_job_timeout_across_deliveries_fails_the_run(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    async with running_app(make_settings(worker_job_timeout_seconds=60)) as (app, client):
        run_id = await new_run(app)
        await set_run(app, run_id, started_at=utcnow() - timedelta(seconds=61))
        response = await push(client, {"run_id": run_id})
        assert response.status_code == 204
        run = await run_json(client, run_id)
        assert run["status"] == "failed"
        assert "job timeout" in run["error_message"]
        assert llm.calls() == []


async def test_job_timeout_reached_during_a_delivery_fails_the_run(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    llm.step_delay["expand"] = 3.0
    async with running_app(make_settings(worker_job_timeout_seconds=1.0)) as (app, client):
        run_id = await new_run(app)
        response = await push(client, {"run_id": run_id})
        assert response.status_code == 204
        run = await run_json(client, run_id)
        assert run["status"] == "failed"
        assert "job timeout" in run["error_message"]


async def test_delivery_attempt_is_recorded_but_never_fails_a_run(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    """Pub/Sub's counter also counts deliveries refused before any work: time decides."""
    app, client = app_client
    run_id = await new_run(app)
    llm.queue("expand", *[Reply(500)] * 40)
    for attempt in (3, 5, 50):
        body = encode_wrapped({"run_id": run_id}, "m-att", SUBSCRIPTION, delivery_attempt=attempt)
        assert (await client.post("/pubsub/push", content=body)).status_code == 503
        run = await run_json(client, run_id)
        assert run["last_delivery_attempt"] == attempt
        assert run["status"] == "running"
        assert run["lease_owner"] is None

    # Without the header, our own count rises past MAX_DELIVERY_ATTEMPTS just the same.
    for _ in range(3):
        assert (await push(client, {"run_id": run_id})).status_code == 503
    llm.reset()
    assert (await push(client, {"run_id": run_id})).status_code == 204
    run = await run_json(client, run_id)
    assert run["status"] == "completed"
    assert run["delivery_count"] == 7


async def test_database_going_away_answers_503_and_recovers(
    make_settings: Callable[..., Settings], pg_url: str, llm: FakeOpenAI
) -> None:
    proxy = TcpProxy("127.0.0.1", 5432)
    await proxy.start()
    proxied = pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    try:
        async with running_app(make_settings(database_url=proxied)) as (app, client):
            run_id = await new_run(app)
            await proxy.stop()
            response = await push(client, {"run_id": run_id})
            assert response.status_code == 503
            assert (await client.get("/ready")).status_code == 503
            await proxy.start()
            # The cached "unreachable" stands at most a second; then the instance serves.
            statuses = []
            for _ in range(30):
                statuses.append((await push(client, {"run_id": run_id})).status_code)
                if statuses[-1] != 503:
                    break
                await asyncio.sleep(0.1)
            assert statuses[-1] == 204
            assert len(statuses) <= 15
            assert (await run_json(client, run_id))["status"] == "completed"
    finally:
        await proxy.stop()


async def test_a_full_instance_queues_deliveries_for_a_run_slot(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    llm.step_delay["expand"] = 0.3
    async with running_app(make_settings(worker_max_concurrency=1)) as (app, client):
        run_ids = [await new_run(app) for _ in range(3)]
        responses = await asyncio.gather(*(push(client, {"run_id": r}) for r in run_ids))
        assert [r.status_code for r in responses] == [204, 204, 204]
    assert len(llm.calls()) == 18


async def test_a_full_instance_asks_for_redelivery_after_a_bounded_wait(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    # One run slot; the wait for it is a quarter of the 2 s push deadline.
    llm.step_delay["expand"] = 1.5
    settings = make_settings(worker_max_concurrency=1, push_deadline_seconds=2.0)
    async with running_app(settings) as (app, client):
        first, second = await new_run(app), await new_run(app)
        slow = asyncio.create_task(push(client, {"run_id": first}))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        response = await push(client, {"run_id": second})
        assert response.status_code == 503
        assert response.json()["code"] == "overloaded"
        assert time.monotonic() - started < 1.5
        assert (await slow).status_code == 204
        # A duplicate of a finished run takes no slot, so it never waits for one.
        assert (await push(client, {"run_id": first})).status_code == 204
        run = await run_json(client, second)
        assert run["delivery_count"] == 0  # refused before any claim: nothing counted


async def test_unknown_message_id_is_stable_across_runs(app_client: AppClient) -> None:
    """Different subscriptions with the same messageId are different messages."""
    _, client = app_client
    job = {"idea": "A neighbourhood seed exchange."}
    for subscription in ("projects/p/subscriptions/a", "projects/p/subscriptions/b"):
        body = encode_wrapped(job, "same-id", subscription)
        assert (await client.post("/pubsub/push", content=body)).status_code == 204
    assert (await client.get("/v1/runs")).json()["total"] == 2


async def test_heartbeat_keeps_the_lease_alive_through_a_long_step(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    # The expand call lasts three lease lengths; only the heartbeat keeps the lease live.
    llm.step_delay["expand"] = 3.0
    async with running_app(make_settings(run_lease_seconds=1.0)) as (app, client):
        run_id = await new_run(app)
        first = asyncio.create_task(push(client, {"run_id": run_id}))
        await asyncio.sleep(2.0)
        duplicate = await push(client, {"run_id": run_id})
        assert duplicate.status_code == 409
        assert (await first).status_code == 204
    assert len(llm.calls()) == 6


async def test_a_delivery_that_lost_its_lease_stops_writing(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    app, client = app_client
    for persona in ("architect", "critic", "optimist", "security_guardian", "user_advocate"):
        llm.step_delay[f"review_{persona}"] = 1.0
    run_id = await new_run(app)
    first = asyncio.create_task(push(client, {"run_id": run_id}))
    for _ in range(100):
        if len(llm.calls()) == 6:
            break
        await asyncio.sleep(0.05)
    # Another delivery takes the run over while the reviews are in flight.
    await set_run(
        app, run_id, lease_owner="thief/1", lease_expires_at=utcnow() + timedelta(seconds=60)
    )
    response = await first
    assert response.status_code == 409
    run = await run_json(client, run_id)
    assert run["lease_owner"] == "thief/1"
    assert run["persona_reviews"] == []
    assert run["status"] == "running"
