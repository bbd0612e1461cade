"""Fault injection: a database that hangs or refuses, a role out of connections, a crowded
instance, a refused last delivery, a broken heartbeat. Every scenario ends with every run
completed (or failed only by the job timeout), none stranded, and exactly one LLM call per
recorded step attempt: nothing is run twice.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import asyncpg
import httpx2
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import DBAPIError

import app.store.runs as runs_module
from app.domain.personas import AGGREGATE_STEP
from app.push.envelope import encode_wrapped
from app.settings import Settings
from app.store.base import is_transient
from app.store.db import connection_bounds
from app.store.recovery import RecoveryStore
from app.store.runs import RunStore
from app.store.tables import DeadLetter, Run
from tests.conftest import PG_ADMIN_DSN, StartApp, running_app, services_of
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.fakes.tcp_proxy import TcpProxy
from tests.procs import eventually
from tests.test_delivery_contract import lifecycle_events
from tests.test_push_pipeline import SUBSCRIPTION, new_run, push, run_json

# Small bounds so a hanging database shows within seconds.
FAST_DB: dict[str, Any] = {"db_statement_timeout_seconds": 1.0, "db_connect_timeout_seconds": 1.0}
FAST_DB_ENV = {"DB_STATEMENT_TIMEOUT_SECONDS": "1", "DB_CONNECT_TIMEOUT_SECONDS": "1"}
AppClient = tuple[FastAPI, httpx2.AsyncClient]


@asynccontextmanager
async def proxied_database(pg_url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    proxy = TcpProxy("127.0.0.1", 5432)
    await proxy.start()
    try:
        yield proxy, pg_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    finally:
        proxy.restore()
        await proxy.stop()


class PubSubLike:
    """Pub/Sub's part: deliver each run until a 2xx, redelivering any other answer after
    `delay`, with a growing `deliveryAttempt`. Records every answer."""

    def __init__(self, client: httpx2.AsyncClient, delay: float = 0.3) -> None:
        self._client = client
        self._delay = delay
        self.answers: dict[str, list[int]] = {}
        self.answered_at: dict[str, list[float]] = {}

    async def deliver_all(self, run_ids: list[str], seconds: float) -> None:
        await asyncio.wait_for(
            asyncio.gather(*(self._until_acked(run_id) for run_id in run_ids)), seconds
        )

    async def _until_acked(self, run_id: str) -> None:
        answers = self.answers.setdefault(run_id, [])
        times = self.answered_at.setdefault(run_id, [])
        message_id = uuid.uuid4().hex
        for attempt in range(1, 1000):
            body = encode_wrapped({"run_id": run_id}, message_id, SUBSCRIPTION, attempt)
            try:
                status = (await self._client.post("/pubsub/push", content=body)).status_code
            except httpx2.HTTPError:
                status = 0  # connection reset: Pub/Sub redelivers that too
            answers.append(status)
            times.append(time.monotonic())
            if 200 <= status < 300:
                return
            await asyncio.sleep(self._delay)

    def all_answers(self) -> list[int]:
        return [status for answers in self.answers.values() for status in answers]


async def assert_executed_once(
    store: RunStore, llm: FakeOpenAI, run_ids: list[str], exact: bool = True
) -> None:
    """Every run completed and holds no lease; no LLM call was made twice or unrecorded.

    Each call carries `<run_id>/<step>/<attempt>`, recorded before it is sent. `exact`: every
    recorded attempt was sent; without it, a delivery deadline may have cut an attempt between
    its record and its request, so a step may have more attempts than calls, never fewer.
    """
    for run_id in run_ids:
        run = await store.get_run(run_id)
        assert run is not None
        assert run.status == "completed", (run.status, run.error_message)
        assert run.lease_owner is None
        calls = [c for c in llm.calls() if c.client_request_id.startswith(f"{run_id}/")]
        assert len({c.client_request_id for c in calls}) == len(calls)
        for step in run.steps:
            if step.step_name == AGGREGATE_STEP:
                continue
            sent = sum(1 for c in calls if c.step == step.step_name)
            assert 1 <= sent <= step.attempts, (run_id, step.step_name, sent, step.attempts)
            if exact:
                assert sent == step.attempts, (run_id, step.step_name, sent, step.attempts)


# --- the database hangs ------------------------------------------------------------------


async def test_silent_database_outage_mid_run_loses_nothing(
    pg_url: str, store: RunStore, llm: FakeOpenAI, start_app: StartApp
) -> None:
    """The database stops answering (nothing refused) for 5 s while runs are mid-review."""
    for persona in ("architect", "critic", "optimist", "security_guardian", "user_advocate"):
        llm.step_delay[f"review_{persona}"] = 1.0
    async with proxied_database(pg_url) as (proxy, proxied):
        # In a thread: the proxy runs on this event loop and must answer the app's start-up.
        app = await asyncio.to_thread(start_app, DATABASE_URL=proxied, **FAST_DB_ENV)
        run_ids = [(await store.create_run(f"Idea number {i}.", None)).id for i in range(5)]
        async with httpx2.AsyncClient(base_url=app.url, timeout=60) as client:
            pubsub = PubSubLike(client)
            delivering = asyncio.create_task(pubsub.deliver_all(run_ids, 90))

            async def reviews_in_flight() -> bool:
                return len(llm.calls()) >= 10

            await eventually(reviews_in_flight, 20, "reviews in flight")
            in_flight = list(run_ids)  # nothing answered yet: every delivery is mid-run
            assert not pubsub.all_answers()
            proxy.blackhole()
            cut_at = time.monotonic()

            async def every_delivery_answered() -> bool:
                return all(pubsub.answers.get(run_id) for run_id in in_flight)

            # Before: a delivery held its lease until SIGKILL. Now each answers once its lease
            # could not be renewed (RUN_LEASE_SECONDS=2) and its bounded wrap-up is over.
            await eventually(every_delivery_answered, 15, "in-flight deliveries to answer")
            answered_after = time.monotonic() - cut_at
            await asyncio.sleep(max(5.0 - answered_after, 0))
            proxy.restore()
            back_at = time.monotonic()
            await delivering
            completed_after = time.monotonic() - back_at

    assert answered_after < 8.0
    assert 500 not in pubsub.all_answers()
    assert 503 in pubsub.all_answers()
    await assert_executed_once(store, llm, run_ids, exact=False)
    print(
        f"\nin-flight deliveries all answered {answered_after:.1f}s into the outage; "
        f"all runs completed {completed_after:.1f}s after the database returned"
    )


async def test_a_session_left_idle_in_transaction_does_not_block_redeliveries(
    make_settings: Callable[..., Settings], pg_url: str, llm: FakeOpenAI
) -> None:
    """A session cut mid-transaction holds the run's row lock: redeliveries answer 503 on the
    lock timeout, and the server ends the session on the idle-in-transaction timeout."""
    settings = make_settings(**FAST_DB)
    async with running_app(settings) as (app, client):
        run_id = await new_run(app)
        bounds = connection_bounds(settings)
        dsn = pg_url.replace("postgresql+asyncpg://", "postgresql://")
        wedged = await asyncpg.connect(dsn, server_settings=bounds["server_settings"])
        try:
            await wedged.execute("BEGIN")
            await wedged.execute("SELECT 1 FROM runs WHERE id = $1 FOR UPDATE", run_id)
            started = time.monotonic()
            response = await push(client, {"run_id": run_id})
            assert response.status_code == 503
            assert time.monotonic() - started < 5

            async def served() -> bool:
                return (await push(client, {"run_id": run_id})).status_code == 204

            await eventually(served, 15, "the idle session to be ended and the run served")
        finally:
            await wedged.close()
        assert (await run_json(client, run_id))["status"] == "completed"


async def test_sigterm_exits_in_time_with_the_database_hanging(
    pg_url: str, store: RunStore, llm: FakeOpenAI, start_app: StartApp
) -> None:
    for persona in ("optimist", "security_guardian", "user_advocate"):
        llm.step_delay[f"review_{persona}"] = 30.0
    async with proxied_database(pg_url) as (proxy, proxied):
        app = await asyncio.to_thread(start_app, DATABASE_URL=proxied, RUN_LEASE_SECONDS="60")
        run = await store.create_run("A community tool library.", None)
        body = encode_wrapped({"run_id": run.id}, "m-sigterm", SUBSCRIPTION)
        async with httpx2.AsyncClient(base_url=app.url, timeout=60) as client:
            in_flight = asyncio.create_task(client.post("/pubsub/push", content=body))

            async def reviews_in_flight() -> bool:
                return len(llm.calls()) == 6

            await eventually(reviews_in_flight, 20, "all six LLM calls in flight")
            proxy.blackhole()
            started = time.monotonic()
            app.signal(signal.SIGTERM)
            assert (await asyncio.wait_for(in_flight, 10)).status_code == 503
            await asyncio.to_thread(app.wait, 10)
            exited_after = time.monotonic() - started
    assert exited_after < 10
    shutdown_lines = [line for line in app.log().splitlines() if "shutting down" in line]
    assert shutdown_lines and all(run.id not in line for line in shutdown_lines)
    print(f"\nSIGTERM to exit with the database hanging: {exited_after:.1f}s")


# --- the database refuses, or is out of connections ----------------------------------------


async def test_an_instance_started_during_an_outage_serves_once_the_database_returns(
    make_settings: Callable[..., Settings], pg_url: str, store: RunStore, llm: FakeOpenAI
) -> None:
    run = await store.create_run("A shared grocery list app for households.", None)
    async with proxied_database(pg_url) as (proxy, proxied):
        await proxy.stop()
        settings = make_settings(database_url=proxied, **FAST_DB)
        async with running_app(settings, clean=False) as (_, client):
            response = await push(client, {"run_id": run.id})
            assert response.status_code == 503
            assert response.json()["code"] == "database_unavailable"
            assert (await client.get("/v1/runs")).status_code == 503
            await proxy.start()
            returned = time.monotonic()

            async def served() -> bool:
                return (await push(client, {"run_id": run.id})).status_code == 204

            await eventually(served, 10, "the instance to serve again")
            healed_after = time.monotonic() - returned
    assert healed_after < 3
    await assert_executed_once(store, llm, [run.id])


async def test_the_api_answers_503_when_the_database_goes_away_mid_request(
    make_settings: Callable[..., Settings], pg_url: str, llm: FakeOpenAI
) -> None:
    async with proxied_database(pg_url) as (proxy, proxied):
        settings = make_settings(database_url=proxied, **FAST_DB)
        async with running_app(settings) as (app, client):
            run_id = await new_run(app)
            assert (await client.get(f"/v1/runs/{run_id}")).status_code == 200
            await proxy.stop()  # readiness still cached as current: the query itself fails
            for path in (f"/v1/runs/{run_id}", "/v1/runs"):
                response = await client.get(path)
                assert response.status_code == 503
                assert response.json()["code"] == "database_unavailable"
            submitted = await client.post("/v1/full-review", json={"idea": "A seed library."})
            assert submitted.status_code == 503


async def execute(dsn: str, *statements: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture
async def limited_role_url(pg_url: str) -> AsyncIterator[str]:
    """The test database through a role allowed only 2 connections."""
    role = f"ce_limited_{uuid.uuid4().hex[:8]}"
    database = pg_url.rsplit("/", 1)[1]
    owner_dsn = pg_url.replace("postgresql+asyncpg://", "postgresql://")
    await execute(
        PG_ADMIN_DSN,
        f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 2",
        f'GRANT ALL ON DATABASE "{database}" TO {role}',
    )
    await execute(
        owner_dsn,
        f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}",
        f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}",
    )
    try:
        yield f"postgresql+asyncpg://{role}@{pg_url.split('@', 1)[1]}"
    finally:
        await execute(
            owner_dsn,
            f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}",
            f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}",
        )
        await execute(
            PG_ADMIN_DSN, f'REVOKE ALL ON DATABASE "{database}" FROM {role}', f"DROP ROLE {role}"
        )


async def test_too_many_connections_answers_503_and_keeps_no_lease(
    make_settings: Callable[..., Settings],
    limited_role_url: str,
    store: RunStore,
    llm: FakeOpenAI,
) -> None:
    """SQLSTATE 53300 (too many connections) is transient: 503, never 500, nothing held."""
    for persona in ("architect", "critic"):
        llm.step_delay[f"review_{persona}"] = 0.3
    settings = make_settings(
        database_url=limited_role_url, db_pool_size=6, run_lease_seconds=2.0, **FAST_DB
    )
    run_ids = [(await store.create_run(f"Idea number {i}.", None)).id for i in range(8)]
    async with running_app(settings, clean=False) as (_, client):
        pubsub = PubSubLike(client, delay=0.2)
        await pubsub.deliver_all(run_ids, 90)
    assert 503 in pubsub.all_answers()
    assert set(pubsub.all_answers()) <= {204, 409, 503}
    await assert_executed_once(store, llm, run_ids, exact=False)


@pytest.mark.parametrize(
    ("sqlstate", "transient"),
    [
        ("53300", True),  # too many connections
        ("53100", True),  # disk full
        ("57P01", True),  # admin shutdown
        ("57P03", True),  # cannot connect now: starting up (Cloud SQL maintenance)
        ("57014", True),  # query cancelled (statement timeout)
        ("40001", True),  # serialization failure
        ("40P01", True),  # deadlock
        ("55P03", True),  # lock not available (lock timeout)
        ("25P03", True),  # idle-in-transaction session timeout
        ("08006", True),  # connection failure
        ("23505", False),  # unique violation: a bug or a race the caller handles
        ("42P01", False),  # undefined table: the schema, not the moment
        ("22021", False),  # invalid byte sequence: the input, not the moment
    ],
)
def test_database_errors_are_classified_by_sqlstate(sqlstate: str, transient: bool) -> None:
    class DriverError(Exception):
        def __init__(self) -> None:
            super().__init__(f"SQLSTATE {sqlstate}")
            self.sqlstate = sqlstate

    error = DBAPIError("UPDATE runs ...", None, DriverError())
    assert is_transient(error) is transient


# --- crowded instances and refused deliveries ---------------------------------------------


async def test_a_crowded_instance_never_fails_a_healthy_run(
    make_settings: Callable[..., Settings], store: RunStore, llm: FakeOpenAI
) -> None:
    """Many senders, few run slots, a transient LLM error here and there: deliveries refused
    before a claim burn Pub/Sub's attempts, but no run fails for it."""
    llm.step_delay["expand"] = 0.2
    llm.queue("review_critic", *[Reply(500)] * 6)
    run_ids = [(await store.create_run(f"Idea number {i}.", None)).id for i in range(24)]
    # A short push deadline keeps the wait for a run slot short (a quarter of it), so most
    # deliveries are refused before any claim, as on an instance with no room to queue.
    settings = make_settings(
        worker_max_concurrency=3, max_retries_per_persona=1, push_deadline_seconds=1.0
    )
    async with running_app(settings, clean=False) as (_, client):
        pubsub = PubSubLike(client, delay=0.1)
        await pubsub.deliver_all(run_ids, 120)
    attempts_needed = [len(answers) for answers in pubsub.answers.values()]
    assert max(attempts_needed) > 5  # Pub/Sub's counter went past MAX_DELIVERY_ATTEMPTS
    assert set(pubsub.all_answers()) <= {204, 409, 503}
    await assert_executed_once(store, llm, run_ids, exact=False)


async def test_a_run_whose_last_delivery_was_refused_is_re_enqueued_by_the_sweep(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    """Its last delivery got 409 (a dead owner's lease), then nothing redelivers it."""
    settings = make_settings(run_stale_seconds=1.0, sweep_interval_seconds=0.3)
    async with running_app(settings) as (app, client):
        with lifecycle_events() as events:
            run_id = await new_run(app)
            await RecoveryStore(services_of(app).engine).mark_published(run_id)
            await set_run(app, run_id, lease_owner="dead/1", lease_expiry_seconds=1)
            assert (await push(client, {"run_id": run_id})).status_code == 409

            async def completed() -> bool:
                return bool((await run_json(client, run_id))["status"] == "completed")

            await eventually(completed, 15, "the sweep to re-enqueue the run")
            run = await services_of(app).store.get_run(run_id)
            assert run is not None and run.requeue_count >= 1
            await assert_executed_once(services_of(app).store, llm, [run_id])
            assert "run_requeued" in events


async def test_the_sweep_fails_runs_past_the_job_timeout_with_the_last_error(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    settings = make_settings(worker_job_timeout_seconds=60)
    async with running_app(settings) as (app, client):
        stuck, fresh = await new_run(app), await new_run(app)
        await set_run(app, stuck, started_seconds_ago=61, error_message="HTTP 500 from the LLM")
        await set_run(app, fresh, started_seconds_ago=10)
        response = await client.post("/tasks/sweep")
        assert response.status_code == 200
        assert response.json()["timed_out"] == 1
        run = await run_json(client, stuck)
        assert run["status"] == "failed"
        assert "job timeout of 60s exceeded" in run["error_message"]
        assert "HTTP 500 from the LLM" in run["error_message"]
        assert (await run_json(client, fresh))["status"] == "running"


async def test_the_sweep_republishes_only_runs_that_need_it(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    """A run whose publish failed is published; one made from a push never is."""
    llm.outage(500)
    async with running_app(make_settings(max_retries_per_persona=0)) as (app, client):
        unpublished = await new_run(app)
        await set_run(app, unpublished, created_seconds_ago=60)
        pushed = encode_wrapped({"idea": "A seed library."}, "m-pushed", SUBSCRIPTION)
        assert (await client.post("/pubsub/push", content=pushed)).status_code == 503
        response = await client.post("/tasks/sweep")
        assert response.json() == {"timed_out": 0, "requeued": 0, "published": 1}
        assert (await client.post("/tasks/sweep")).json()["published"] == 0


# --- dead letters --------------------------------------------------------------------------


def dead_letter(job: dict[str, Any], attempts: int = 5, message_id: str | None = None) -> bytes:
    body = encode_wrapped(job, message_id or uuid.uuid4().hex, "projects/p/subscriptions/dlq")
    envelope = json.loads(body)
    envelope["message"]["attributes"] = {
        "CloudPubSubDeadLetterSourceDeliveryCount": str(attempts),
        "CloudPubSubDeadLetterSourceSubscription": SUBSCRIPTION,
    }
    return json.dumps(envelope).encode()


async def dead_letter_actions(app: FastAPI) -> list[str]:
    async with services_of(app).engine.connect() as connection:
        rows = await connection.execute(select(DeadLetter.action).order_by(DeadLetter.id))
        return [row[0] for row in rows]


async def test_a_dead_lettered_run_is_re_enqueued_while_the_job_timeout_allows(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    app, client = app_client
    run_id = await new_run(app)
    response = await client.post("/pubsub/dead-letter", content=dead_letter({"run_id": run_id}))
    assert response.status_code == 204

    async def completed() -> bool:
        return bool((await run_json(client, run_id))["status"] == "completed")

    await eventually(completed, 10, "the re-enqueued run to complete")
    assert await dead_letter_actions(app) == ["requeued"]
    await assert_executed_once(services_of(app).store, llm, [run_id])


async def test_a_dead_lettered_run_past_the_job_timeout_is_failed_with_the_reason(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    async with running_app(make_settings(worker_job_timeout_seconds=60)) as (app, client):
        run_id = await new_run(app)
        await set_run(app, run_id, started_seconds_ago=61, error_message="HTTP 429 from the LLM")
        body = dead_letter({"run_id": run_id}, attempts=5)
        assert (await client.post("/pubsub/dead-letter", content=body)).status_code == 204
        run = await run_json(client, run_id)
        assert run["status"] == "failed"
        assert run["error_message"].startswith("dead-lettered after 5 attempts")
        assert "HTTP 429 from the LLM" in run["error_message"]
        # A finished run's dead letter, and garbage, are acknowledged too.
        assert (await client.post("/pubsub/dead-letter", content=body)).status_code == 204
        garbage = await client.post("/pubsub/dead-letter", content=b"\x00not json")
        assert garbage.status_code == 204
        assert await dead_letter_actions(app) == ["failed", "finished"]
    assert len(llm.calls()) == 0


async def test_a_dead_lettered_self_contained_job_maps_to_its_original_run(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    _, client = app_client
    llm.outage(500)
    job = {"idea": "A neighbourhood seed exchange."}
    original = encode_wrapped(job, "m-original", SUBSCRIPTION)
    assert (await client.post("/pubsub/push", content=original)).status_code == 503
    llm.outage(None)
    body = dead_letter(job, message_id="m-original")
    assert (await client.post("/pubsub/dead-letter", content=body)).status_code == 204
    runs = (await client.get("/v1/runs")).json()["runs"]
    assert len(runs) == 1

    async def completed() -> bool:
        return bool((await run_json(client, runs[0]["run_id"]))["status"] == "completed")

    await eventually(completed, 10, "the original run to complete")


# --- leases ----------------------------------------------------------------------------------


async def test_leases_are_judged_on_the_database_clock(
    app_client: AppClient, llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance whose clock runs 10 minutes ahead must not take a live lease."""
    app, client = app_client
    run_id = await new_run(app)
    await set_run(app, run_id, lease_owner="other/1", lease_expiry_seconds=60)
    ahead = runs_module.utcnow() + timedelta(minutes=10)
    monkeypatch.setattr(runs_module, "utcnow", lambda: ahead)
    assert (await push(client, {"run_id": run_id})).status_code == 409
    assert len(llm.calls()) == 0


async def test_a_heartbeat_error_neither_kills_the_lease_nor_answers_500(
    make_settings: Callable[..., Settings], llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm.step_delay["expand"] = 2.0
    failures = {"left": 1}
    original = RunStore.heartbeat

    async def flaky(self: RunStore, run_id: str, owner: str, lease_seconds: float) -> bool:
        if failures["left"] > 0:
            failures["left"] -= 1
            raise RuntimeError("a bug in the heartbeat")
        return await original(self, run_id, owner, lease_seconds)

    monkeypatch.setattr(RunStore, "heartbeat", flaky)
    async with running_app(make_settings(run_lease_seconds=1.5)) as (app, client):
        run_id = await new_run(app)
        assert (await push(client, {"run_id": run_id})).status_code == 204
        assert (await run_json(client, run_id))["status"] == "completed"

        # A heartbeat that never works: the delivery gives up before the lease lapses.
        failures["left"] = 10_000
        second = await new_run(app)
        started = time.monotonic()
        response = await push(client, {"run_id": second})
        assert response.status_code == 503
        assert time.monotonic() - started < 5
        run = await run_json(client, second)
        assert run["status"] == "running"
        assert run["lease_owner"] is None
        failures["left"] = 0
        llm.step_delay.clear()
        assert (await push(client, {"run_id": second})).status_code == 204
        await assert_executed_once(services_of(app).store, llm, [run_id, second])


async def set_run(
    app: FastAPI,
    run_id: str,
    lease_owner: str | None = None,
    lease_expiry_seconds: float | None = None,
    started_seconds_ago: float | None = None,
    created_seconds_ago: float | None = None,
    error_message: str | None = None,
) -> None:
    """Put a run into a state a test needs, with times on the database's clock."""
    values: dict[str, Any] = {}
    now = func.clock_timestamp()
    if lease_owner is not None:
        values["lease_owner"] = lease_owner
        values["status"] = "running"
    if lease_expiry_seconds is not None:
        values["lease_expires_at"] = now + text(f"interval '{lease_expiry_seconds} seconds'")
    if started_seconds_ago is not None:
        values["started_at"] = now - text(f"interval '{started_seconds_ago} seconds'")
        values["status"] = "running"
    if created_seconds_ago is not None:
        past = now - text(f"interval '{created_seconds_ago} seconds'")
        values.update(created_at=past, queued_at=past, updated_at=past)
    if error_message is not None:
        values["error_message"] = error_message
    async with services_of(app).engine.begin() as connection:
        await connection.execute(update(Run).where(Run.id == run_id).values(**values))
