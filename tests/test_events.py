"""Live run events (GET /v1/runs/{run_id}/events) from real processes over real HTTP.

A run executed by one uvicorn process is followed from another: PostgreSQL's NOTIFY carries the
events between them. Resuming with Last-Event-ID, the stream's end, 204 and its refusals; the
listener surviving its connection being killed; events of a transaction that rolled back never
sent; the embedded SQLite default's in-process broadcaster; a shutdown that ends open streams.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from app.api.events import _stream
from app.domain.models import PersonaReview, TokenUsage
from app.domain.personas import STEP_NAMES
from app.errors import StoreUnavailable
from app.events import RunEvents, Signal
from app.push.envelope import encode_wrapped
from app.settings import Settings
from app.store.events import EventStore, RunEvent
from app.store.runs import RunStore
from app.store.tables import RunEventRow
from tests.conftest import PG_ADMIN_DSN, StartApp, running_app, services_of
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.procs import AppProcess
from tests.test_process_lifecycle import deliver
from tests.test_push_pipeline import SUBSCRIPTION

IDEA = "A neighbourhood tool library. Members borrow drills and ladders instead of buying them."
# One LLM call per step slowed down, so the stream is read while the run executes.
STEP_DELAY = 0.3
# Every event of a run that completes at the first attempt of every step, in number order
# (the reviews' events interleave, so only the counts and the ends are fixed).
EVENTS_OF_A_RUN = 2 * len(STEP_NAMES) + 1


@dataclass(frozen=True)
class Sent:
    """One event as a client read it off the wire."""

    id: int
    event: str
    data: dict[str, Any]
    received_at: float


async def read_stream(
    url: str, last_event_id: str | None = None, seconds: float = 30.0
) -> tuple[int, list[Sent], list[str]]:
    """GET the stream until the server ends it: (status, events, comment and retry lines)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    events: list[Sent] = []
    other: list[str] = []
    async with (
        asyncio.timeout(seconds),
        httpx2.AsyncClient(timeout=seconds) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        if response.status_code != 200:
            await response.aread()
            return response.status_code, events, other
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line == "":
                if "data" in fields:
                    events.append(
                        Sent(
                            int(fields["id"]),
                            fields["event"],
                            json.loads(fields["data"]),
                            time.monotonic(),
                        )
                    )
                fields = {}
            elif line.startswith((":", "retry:")):
                other.append(line)
            else:
                name, _, value = line.partition(": ")
                fields[name] = value
    return 200, events, other


async def push(url: str, run_id: str) -> int:
    """Deliver the run's job to the app at `url` as Pub/Sub would; the answer's status."""
    return await deliver(url, encode_wrapped({"run_id": run_id}, f"m-{run_id}", SUBSCRIPTION))


def events_url(base: str, run_id: str) -> str:
    return f"{base}/v1/runs/{run_id}/events"


def slow_steps(llm: FakeOpenAI) -> None:
    for step in STEP_NAMES[:-1]:
        llm.step_delay[step] = STEP_DELAY


def assert_a_whole_run(events: list[Sent], run_id: str) -> None:
    assert [e.id for e in events] == list(range(1, EVENTS_OF_A_RUN + 1))
    assert all(e.data["seq"] == e.id and e.data["run_id"] == run_id for e in events)
    assert all(e.data["event"] == e.event for e in events)
    assert (events[0].event, events[0].data["step_name"]) == ("step_started", "expand")
    assert events[-1].event == "run_completed"
    assert events[-1].data["decision_label"] in ("approve", "revise", "reject")
    completed = [e.data for e in events if e.event == "step_completed"]
    assert sorted(d["step_name"] for d in completed) == sorted(STEP_NAMES)
    expand = next(d for d in completed if d["step_name"] == "expand")
    assert expand["total_tokens"] > 0 and expand["model"] and expand["cost_usd"] is not None
    for step in STEP_NAMES:
        started = next(
            e.id for e in events if e.event == "step_started" and e.data["step_name"] == step
        )
        done = next(
            e.id for e in events if e.event == "step_completed" and e.data["step_name"] == step
        )
        assert started < done, step


async def test_a_run_executed_by_another_process_streams_live_and_ends(
    start_app: StartApp, store: RunStore, llm: FakeOpenAI
) -> None:
    slow_steps(llm)
    viewer, worker = start_app(), start_app()
    run = await store.create_run(IDEA, None)
    reading = asyncio.create_task(read_stream(events_url(viewer.url, run.id)))
    await asyncio.sleep(0.5)  # the stream is open (and listening) before the run starts
    assert await push(worker.url, run.id) == 204
    status, events, other = await reading
    assert status == 200
    assert other[0] == "retry: 2000"
    assert_a_whole_run(events, run.id)
    # Live, not all at the end: the proposal's event came while the (slowed) reviews ran.
    expanded = next(e for e in events if e.event == "step_completed")
    assert events[-1].received_at - expanded.received_at >= STEP_DELAY * 0.8


async def test_last_event_id_resumes_after_it_and_a_finished_run_answers_204(
    start_app: StartApp, store: RunStore, llm: FakeOpenAI
) -> None:
    app = start_app()
    run = await store.create_run(IDEA, None)
    assert await push(app.url, run.id) == 204
    status, everything, _ = await read_stream(events_url(app.url, run.id))
    assert status == 200
    assert_a_whole_run(everything, run.id)

    status, rest, _ = await read_stream(events_url(app.url, run.id), last_event_id="5")
    assert status == 200
    assert [e.id for e in rest] == list(range(6, EVENTS_OF_A_RUN + 1))
    assert [e.data for e in rest] == [e.data for e in everything[5:]]

    # A page that shows the run as of event 5 asks for what came after it.
    status, from_page, _ = await read_stream(events_url(app.url, run.id) + "?after=5")
    assert [e.id for e in from_page] == [e.id for e in rest]
    # A reconnect's Last-Event-ID is newer than the URL's `after`, and wins.
    status, newer, _ = await read_stream(
        events_url(app.url, run.id) + "?after=5", last_event_id=str(EVENTS_OF_A_RUN - 1)
    )
    assert [e.id for e in newer] == [EVENTS_OF_A_RUN]

    status, nothing, _ = await read_stream(
        events_url(app.url, run.id), last_event_id=str(EVENTS_OF_A_RUN)
    )
    assert (status, nothing) == (204, [])


# The last one: an Arabic-Indic digit three, which str.isdigit() accepts.
@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "99999999999", "\u0663"])
async def test_a_last_event_id_or_after_that_is_not_ours_is_422(
    start_app: StartApp, store: RunStore, value: str
) -> None:
    app = start_app()
    run = await store.create_run(IDEA, None)
    async with httpx2.AsyncClient(timeout=10) as client:
        url = events_url(app.url, run.id)
        by_header = await client.get(url, headers=[(b"Last-Event-ID", value.encode())])
        by_query = await client.get(url, params={"after": value})
    for answer in (by_header, by_query):
        assert answer.status_code == 422
        assert answer.json()["code"] == "validation_error"


async def test_unknown_run_is_404(start_app: StartApp, store: RunStore) -> None:
    app = start_app()
    async with httpx2.AsyncClient(timeout=10) as client:
        answer = await client.get(events_url(app.url, "not-a-run"))
    assert answer.status_code == 404
    assert answer.json()["code"] == "not_found"


async def test_a_failed_run_streams_its_failure(
    start_app: StartApp, store: RunStore, llm: FakeOpenAI
) -> None:
    llm.queue("expand", Reply(status=400, body={"error": {"message": "bad request"}}))
    app = start_app()
    run = await store.create_run(IDEA, None)
    assert await push(app.url, run.id) == 204
    status, events, _ = await read_stream(events_url(app.url, run.id))
    assert status == 200
    assert [e.event for e in events] == [
        "step_started",
        "step_attempt_failed",
        "step_failed",
        "run_failed",
    ]
    assert all(e.data["step_name"] == "expand" for e in events[:3])
    assert "400" in events[1].data["error_message"] and events[2].data["error_message"]
    assert events[3].data["status"] == "failed" and events[3].data["error_message"]


async def test_sigterm_ends_open_streams_so_the_process_exits_in_time(
    start_app: StartApp, store: RunStore
) -> None:
    app = start_app()
    run = await store.create_run(IDEA, None)  # queued, never delivered: the stream stays open
    reading = asyncio.create_task(read_stream(events_url(app.url, run.id)))
    await asyncio.sleep(0.5)
    assert not reading.done()
    app.signal(signal.SIGTERM)
    stopped = time.monotonic()
    status, events, _ = await asyncio.wait_for(reading, 5)
    assert (status, events) == (200, [])
    assert app.wait(timeout=8) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    # Cloud Run gives 10 s between SIGTERM and SIGKILL.
    assert time.monotonic() - stopped < 8


async def test_the_listener_reconnects_and_streams_catch_up(
    make_settings: Any, llm: FakeOpenAI
) -> None:
    """The LISTEN connection killed by the server: what committed meanwhile is read back."""
    async with running_app(make_settings()) as (app, _client):
        services = services_of(app)
        run = await services.store.create_run(IDEA, None)
        owner = "test-owner"
        assert (await services.store.claim(run.id, owner, 60, None)).outcome == "claimed"
        with services.events.subscribe(run.id) as subscription:
            assert await subscription.get(5) is Signal.RESYNC  # listening
            await services.store.step_started(run.id, owner, "expand")
            live = await subscription.get(5)
            assert isinstance(live, RunEvent) and (live.seq, live.event) == (1, "step_started")

            killed = await _terminate_listeners()
            assert killed == 1
            # Written while nobody listens: it must reach the stream through the backlog.
            await services.store.step_failed(run.id, owner, "expand", "boom")
            item = await subscription.get(10)
            while isinstance(item, RunEvent):  # a NOTIFY sent before the connection died
                item = await subscription.get(10)
            assert item is Signal.RESYNC
            _, backlog = await services.events.backlog(run.id, 1)
            assert [(e.seq, e.event) for e in backlog] == [(2, "step_failed")]
            await services.store.fail(run.id, owner, "gave up")
            after = await subscription.get(5)
            assert isinstance(after, RunEvent) and (after.seq, after.event) == (3, "run_failed")


async def _terminate_listeners() -> int:
    connection = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        rows = await connection.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()"
        )
        return len(rows)
    finally:
        await connection.close()


async def test_events_of_a_transaction_that_rolled_back_are_never_sent(
    make_settings: Any, pg_url: str, llm: FakeOpenAI
) -> None:
    async with running_app(make_settings()) as (app, _client):
        store = services_of(app).store
        run = await store.create_run(IDEA, None)
        owner = "test-owner"
        await store.claim(run.id, owner, 60, None)
        notified: asyncio.Queue[str] = asyncio.Queue()
        listener = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
        try:
            await listener.add_listener(
                "run_events", lambda _c, _p, _ch, payload: notified.put_nowait(payload)
            )
            review = PersonaReview.model_validate(
                {
                    "persona_id": "critic",
                    "persona_name": "Critic",
                    "confidence_score": 0.9,
                    "strengths": [],
                    "concerns": [],
                    "blocking_issues": [],
                    "recommendations": [],
                    "estimated_effort": "small",
                    "dependency_risks": [],
                }
            )
            await store.step_completed(
                run.id, owner, "review_critic", review, TokenUsage(1, 1, 2), "m", 0.0
            )
            first = RunEvent.from_notification(await asyncio.wait_for(notified.get(), 5))
            assert (first.seq, first.event) == (1, "step_completed")
            # The same review again: its insert breaks the unique constraint after the event
            # was added, and the whole transaction rolls back.
            with pytest.raises(IntegrityError):
                await store.step_completed(
                    run.id, owner, "review_critic", review, TokenUsage(1, 1, 2), "m", 0.0
                )
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(notified.get(), 1)
            await store.step_started(run.id, owner, "review_architect")
            after = RunEvent.from_notification(await asyncio.wait_for(notified.get(), 5))
            assert (after.seq, after.event) == (2, "step_started")  # number 2 was not used up
        finally:
            await listener.close()
        async with services_of(app).engine.connect() as connection:
            count = await connection.scalar(
                select(func.count()).select_from(RunEventRow).where(RunEventRow.run_id == run.id)
            )
        assert count == 2


@pytest.fixture
def sqlite_app(tmp_path: Path, llm: FakeOpenAI) -> Iterator[AppProcess]:
    """The embedded default's shape: SQLite, in-process delivery, one process."""
    process = AppProcess(
        {
            "ENV": "development",
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'embedded.db'}",
            "LLM_PROVIDER": "openai",
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": llm.url,
            "UI_ENABLED": "false",
        },
        tmp_path / "sqlite-app.log",
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


async def test_the_embedded_default_streams_from_its_in_process_broadcaster(
    sqlite_app: AppProcess, llm: FakeOpenAI
) -> None:
    slow_steps(llm)
    async with httpx2.AsyncClient(timeout=30) as client:
        answer = await client.post(f"{sqlite_app.url}/v1/full-review", json={"idea": IDEA})
        assert answer.status_code == 202
        run_id = answer.json()["run_id"]
    status, events, _ = await read_stream(events_url(sqlite_app.url, run_id))
    assert status == 200
    assert_a_whole_run(events, run_id)


async def test_settings_keep_the_stream_route_under_the_api_guard(
    make_settings: Any,
) -> None:
    settings: Settings = make_settings(
        api_auth="oidc", api_audiences="https://svc.example", api_allowed_principals="a@b.c"
    )
    async with running_app(settings) as (_app, client):
        answer = await client.get("/v1/runs/x/events")
    assert answer.status_code == 401


async def test_every_store_write_that_changes_progress_numbers_its_event(
    make_settings: Any, llm: FakeOpenAI
) -> None:
    """The numbers a run's events take are the run's event_seq: contiguous from 1."""
    async with running_app(make_settings()) as (app, client):
        answer = await client.post("/v1/full-review", json={"idea": IDEA})
        run_id = answer.json()["run_id"]
        body = encode_wrapped({"run_id": run_id}, "m-events-9", SUBSCRIPTION)
        assert (await client.post("/pubsub/push", content=body)).status_code == 204
        _, events = await services_of(app).events.backlog(run_id, 0)
        assert [e.seq for e in events] == list(range(1, EVENTS_OF_A_RUN + 1))
        stored = await services_of(app).store.get_run(run_id)
        assert stored is not None and stored.event_seq == EVENTS_OF_A_RUN


class _UnreachableEvents(EventStore):
    """An event store whose database has gone away."""

    async def backlog(self, run_id: str, after: int) -> tuple[str | None, Sequence[RunEvent]]:
        raise StoreUnavailable("database unavailable: ConnectionRefusedError")


async def test_a_stream_whose_database_goes_away_ends_instead_of_failing(
    tmp_path: Path,
) -> None:
    """Once the answer has started, a failed read ends the stream (the client resumes with
    Last-Event-ID) rather than breaking the response with an error."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}")
    try:
        events = RunEvents(_UnreachableEvents(engine))
        chunks = [chunk async for chunk in _stream("run-1", 3, events)]
    finally:
        await engine.dispose()
    assert chunks == ["retry: 2000\n\n"]
