"""Traces: one trace per job, from the API request through Pub/Sub into the push delivery, its
claim, steps, LLM attempts and database calls; log lines joined to their span; off by default.

Real parts: PostgreSQL, the openai SDK against the fake LLM server, the Pub/Sub emulator pushing
to the app served by uvicorn. Spans go to an in-memory exporter behind the same batching
processor as Cloud Trace's, so a span that is there when the push answer arrives was flushed.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
import uvicorn
from fastapi import FastAPI
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from app.domain.personas import PERSONAS, STEP_NAMES
from app.logs import configure_logging
from app.main import create_app
from app.push.envelope import encode_wrapped
from app.settings import Settings
from app.store.db import build_engine
from app.store.runs import RunStore
from app.tracing import PushTracing, TracedLLM, _Flusher
from tests.conftest import services_of
from tests.emulator import PROJECT, PubSubEmulator
from tests.fakes.openai_server import USAGE, FakeOpenAI, Reply
from tests.procs import eventually, free_port
from tests.test_revisions import completed_parent, revise

SUBSCRIPTION = "projects/test/subscriptions/consensus-engine-jobs-sub"
# A publisher's span, as its context arrives in the message attributes.
PUBLISHER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PUBLISHER_SPAN = "00f067aa0ba902b7"
# The request's own trace header, as Cloud Run's front end sets it (not sampled).
FRONT_END_TRACE = "0af7651916cd43dd8448eb211c80319c"
FRONT_END_SPAN = "b7ad6b7169203331"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@asynccontextmanager
async def app_with_spans(
    settings: Settings, exporter: InMemorySpanExporter
) -> AsyncIterator[tuple[FastAPI, httpx2.AsyncClient]]:
    """The app on emptied tables, its spans going to `exporter`."""
    engine = build_engine(settings)
    try:
        await RunStore(engine).delete_all()
    finally:
        await engine.dispose()
    app = create_app(settings, span_exporter=exporter)
    async with app.router.lifespan_context(app):
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(
            transport=transport, base_url="http://testserver", timeout=60
        ) as client:
            yield app, client


def traced(make_settings: Callable[..., Settings], **overrides: Any) -> Settings:
    return make_settings(tracing_enabled=True, **overrides)


def push_body(run_id: str, attributes: dict[str, str] | None = None) -> bytes:
    return encode_wrapped({"run_id": run_id}, uuid.uuid4().hex, SUBSCRIPTION, attributes=attributes)


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return format_trace_id(span.context.trace_id)


def hex_span(span: ReadableSpan) -> str:
    assert span.context is not None
    return format_span_id(span.context.span_id)


def parent_of(span: ReadableSpan) -> str | None:
    return format_span_id(span.parent.span_id) if span.parent is not None else None


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def one(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    found = named(spans, name)
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in spans if parent_of(s) == hex_span(parent)]


def descendants(spans: tuple[ReadableSpan, ...], root: ReadableSpan) -> list[ReadableSpan]:
    found: list[ReadableSpan] = []
    frontier = [root]
    while frontier:
        below = [s for parent in frontier for s in children(spans, parent)]
        found.extend(below)
        frontier = below
    return found


def is_db(span: ReadableSpan) -> bool:
    attributes = span.attributes or {}
    return "postgresql" in (attributes.get("db.system"), attributes.get("db.system.name"))


async def test_a_push_delivery_is_one_trace_from_the_publisher_to_the_database_calls(
    make_settings: Callable[..., Settings], llm: FakeOpenAI, exporter: InMemorySpanExporter
) -> None:
    async with app_with_spans(traced(make_settings), exporter) as (app, client):
        run = await services_of(app).store.create_run("A tool library for a street.", None)
        body = push_body(
            run.id, {"googclient_traceparent": f"00-{PUBLISHER_TRACE}-{PUBLISHER_SPAN}-01"}
        )
        response = await client.post(
            "/pubsub/push",
            content=body,
            headers={"traceparent": f"00-{FRONT_END_TRACE}-{FRONT_END_SPAN}-00"},
        )
        assert response.status_code == 204
        # No wait: the answer came after the spans were flushed, the server span's included
        # (the batching processor would otherwise hold them for seconds).
        spans = exporter.get_finished_spans()

    server = one(spans, "POST /pubsub/push")
    assert server.kind is SpanKind.SERVER
    # The delivery continues the publisher's trace, as the publish span's child...
    assert hex_trace(server) == PUBLISHER_TRACE
    assert parent_of(server) == PUBLISHER_SPAN
    # ...and links the request's own trace.
    [link] = server.links
    assert format_trace_id(link.context.trace_id) == FRONT_END_TRACE
    assert format_span_id(link.context.span_id) == FRONT_END_SPAN

    claim = one(spans, "claim")
    assert parent_of(claim) == hex_span(server)
    assert claim.attributes is not None
    assert claim.attributes["run_id"] == run.id
    assert claim.attributes["outcome"] == "completed"

    steps = {
        s.name.removeprefix("step "): s
        for s in children(spans, claim)
        if s.name.startswith("step ")
    }
    assert sorted(steps) == sorted(STEP_NAMES)
    for name, step in steps.items():
        assert step.attributes is not None
        assert step.attributes["step"] == name
        assert step.attributes["attempts"] == 1
        assert step.status.status_code is StatusCode.UNSET

    settings = services_of(app).settings
    attempts = [s for s in spans if s.name.startswith("chat ")]
    assert len(attempts) == 6  # expand and five reviews; the decision calls no model
    for attempt in attempts:
        attributes = attempt.attributes
        assert attributes is not None
        assert attempt.kind is SpanKind.CLIENT
        step_name = str(attributes["step"])
        assert parent_of(attempt) == hex_span(steps[step_name])
        model = (
            settings.effective_expand_model
            if step_name == "expand"
            else settings.effective_review_model
        )
        assert attempt.name == f"chat {model}"
        assert attributes["run_id"] == run.id
        assert attributes["attempt"] == 1
        assert attributes["gen_ai.request.model"] == model
        assert attributes["gen_ai.response.model"] == model
        assert attributes["gen_ai.usage.input_tokens"] == USAGE["input_tokens"]
        assert attributes["gen_ai.usage.output_tokens"] == USAGE["output_tokens"]
        # The HTTP request the openai SDK sent (httpx2 instrumentation) is the attempt's child.
        [http] = children(spans, attempt)
        assert http.kind is SpanKind.CLIENT
        assert http.name == "POST"
    assert children(spans, steps["aggregate_decision"]) == [
        s for s in children(spans, steps["aggregate_decision"]) if is_db(s)
    ]

    database = [s for s in spans if is_db(s)]
    assert children(spans, claim) and any(is_db(s) for s in children(spans, claim))
    for step in steps.values():  # each step's rows are written under its span
        assert any(is_db(s) for s in children(spans, step)), step.name
    assert len(database) >= 20

    # One trace: the delivery's spans are the publisher's trace, and nothing else is in it
    # (the test's own inserts and the start-up queries are traces of their own).
    delivery = descendants(spans, server)
    assert claim in delivery and len(delivery) > 40
    assert {hex_trace(s) for s in delivery} == {PUBLISHER_TRACE}
    in_trace = {hex_span(s) for s in spans if hex_trace(s) == PUBLISHER_TRACE}
    assert in_trace == {hex_span(s) for s in (server, *delivery)}
    # The LLM provider is told the trace too.
    [expand_call] = llm.calls("expand")
    assert PUBLISHER_TRACE in expand_call.headers["traceparent"]


async def test_a_retried_attempt_is_its_own_span_and_an_event_of_its_step(
    make_settings: Callable[..., Settings], llm: FakeOpenAI, exporter: InMemorySpanExporter
) -> None:
    critic = next(p for p in PERSONAS if p.persona_id == "critic").step_name
    llm.queue(critic, Reply(status=500))
    async with app_with_spans(traced(make_settings), exporter) as (app, client):
        run = await services_of(app).store.create_run("A tool library for a street.", None)
        assert (await client.post("/pubsub/push", content=push_body(run.id))).status_code == 204
        spans = exporter.get_finished_spans()

    step = one(spans, f"step {critic}")
    assert step.attributes is not None and step.attributes["attempts"] == 2
    assert [e.name for e in step.events] == ["attempt failed"]
    first, second = sorted(
        (s for s in children(spans, step) if s.name.startswith("chat ")),
        key=lambda s: str((s.attributes or {})["attempt"]),
    )
    assert first.attributes is not None and second.attributes is not None
    assert (first.attributes["attempt"], second.attributes["attempt"]) == (1, 2)
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes["error.type"] == "retryable"
    assert second.status.status_code is StatusCode.UNSET
    # Without a trace context in the message, the delivery starts its own trace.
    server = one(spans, "POST /pubsub/push")
    assert server.parent is None
    assert not server.links


async def test_a_step_the_delivery_abandons_still_ends_its_span(
    make_settings: Callable[..., Settings], llm: FakeOpenAI, exporter: InMemorySpanExporter
) -> None:
    llm.queue("expand", Reply(delay=3.0))
    settings = traced(make_settings, push_deadline_seconds=1.0)
    async with app_with_spans(settings, exporter) as (app, client):
        run = await services_of(app).store.create_run("A tool library for a street.", None)
        assert (await client.post("/pubsub/push", content=push_body(run.id))).status_code == 503
        spans = exporter.get_finished_spans()

    claim = one(spans, "claim")
    assert claim.attributes is not None and claim.attributes["outcome"] == "retry"
    step = one(spans, "step expand")
    assert parent_of(step) == hex_span(claim)
    assert step.status.status_code is StatusCode.ERROR
    assert step.status.description == "step unfinished when the delivery ended"
    [attempt] = [s for s in spans if s.name.startswith("chat ")]
    assert attempt.status.status_code is StatusCode.ERROR
    assert attempt.attributes is not None and attempt.attributes["error.type"] == "CancelledError"


async def test_a_revision_traces_reused_reviews_as_steps_without_calls(
    make_settings: Callable[..., Settings], llm: FakeOpenAI, exporter: InMemorySpanExporter
) -> None:
    async with app_with_spans(traced(make_settings), exporter) as (_, client):
        parent = await completed_parent(client, llm)
        llm.scores.update({"critic": 0.9})
        llm.blocking.clear()
        run = await revise(client, parent["run_id"], edited_proposal={"title": "With aisles"})

        def claims() -> list[ReadableSpan]:
            return [
                s
                for s in named(exporter.get_finished_spans(), "claim")
                if (s.attributes or {})["run_id"] == run["run_id"]
            ]

        async def exported() -> bool:  # in-process: the batch goes out on its schedule
            return bool(claims())

        await eventually(exported, 15, "the revision's claim span")
        [claim] = claims()
        spans = exporter.get_finished_spans()

    below = children(spans, claim)
    steps = {s.name.removeprefix("step "): s for s in below if s.name.startswith("step ")}
    assert sorted(steps) == sorted(STEP_NAMES)
    for name in ("review_architect", "review_optimist", "review_security_guardian"):
        assert (steps[name].attributes or {})["reused_from_run_id"] == parent["run_id"]
        assert not [s for s in children(spans, steps[name]) if s.name.startswith("chat ")]
    for name in ("review_critic", "review_user_advocate"):
        assert "reused_from_run_id" not in (steps[name].attributes or {})
        assert [s for s in children(spans, steps[name]) if s.name.startswith("chat ")]
    # Edits only: the expand step is recorded without a call.
    assert not [s for s in children(spans, steps["expand"]) if s.name.startswith("chat ")]


async def test_log_lines_carry_the_trace_and_span_they_were_logged_in(
    make_settings: Callable[..., Settings],
    llm: FakeOpenAI,
    exporter: InMemorySpanExporter,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with app_with_spans(traced(make_settings), exporter) as (app, client):
        configure_logging(True, "INFO", "my-project")
        try:
            run = await services_of(app).store.create_run("A tool library for a street.", None)
            body = push_body(
                run.id, {"googclient_traceparent": f"00-{PUBLISHER_TRACE}-{PUBLISHER_SPAN}-01"}
            )
            assert (await client.post("/pubsub/push", content=body)).status_code == 204
        finally:
            configure_logging(False, "WARNING", None)
        spans = exporter.get_finished_spans()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    run_lines = [line for line in lines if line.get("run_id") == run.id]
    assert run_lines
    for line in run_lines:
        assert (
            line["logging.googleapis.com/trace"] == f"projects/my-project/traces/{PUBLISHER_TRACE}"
        )
        assert line["logging.googleapis.com/trace_sampled"] is True

    def span_of(event: str) -> set[str]:
        return {
            line["logging.googleapis.com/spanId"]
            for line in run_lines
            if line.get("lifecycle_event") == event
        }

    claim = one(spans, "claim")
    assert span_of("job_started") == {hex_span(claim)}
    assert span_of("job_completed") == {hex_span(claim)}
    step_spans = {hex_span(s) for s in spans if s.name.startswith("step ")}
    assert span_of("step_started") == step_spans
    assert span_of("step_completed") == step_spans


async def test_tracing_off_makes_no_spans_and_hooks_nothing(
    make_settings: Callable[..., Settings],
    llm: FakeOpenAI,
    exporter: InMemorySpanExporter,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings()
    assert settings.tracing_enabled is False  # the default
    async with app_with_spans(settings, exporter) as (app, client):
        runner = services_of(app).receiver._runner
        assert not isinstance(runner._llm, TracedLLM)
        assert not getattr(app, "_is_instrumented_by_opentelemetry", False)
        assert not isinstance(app.build_middleware_stack(), PushTracing)
        configure_logging(True, "INFO", "my-project")
        try:
            run = await services_of(app).store.create_run("A tool library for a street.", None)
            body = push_body(
                run.id, {"googclient_traceparent": f"00-{PUBLISHER_TRACE}-{PUBLISHER_SPAN}-01"}
            )
            response = await client.post(
                "/pubsub/push",
                content=body,
                headers={"x-cloud-trace-context": f"{FRONT_END_TRACE}/1;o=1"},
            )
            assert response.status_code == 204
        finally:
            configure_logging(False, "WARNING", None)
    assert exporter.get_finished_spans() == ()
    assert "traceparent" not in llm.calls("expand")[0].headers
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    run_lines = [line for line in lines if line.get("run_id") == run.id]
    assert run_lines
    for line in run_lines:  # the request's trace header, as before
        assert (
            line["logging.googleapis.com/trace"] == f"projects/my-project/traces/{FRONT_END_TRACE}"
        )
        assert "logging.googleapis.com/spanId" not in line


async def test_the_in_process_queue_carries_the_trace_from_the_api_request_to_the_delivery(
    make_settings: Callable[..., Settings], llm: FakeOpenAI, exporter: InMemorySpanExporter
) -> None:
    async with app_with_spans(traced(make_settings), exporter) as (_, client):
        response = await client.post("/v1/full-review", json={"idea": "A seed library."})
        assert response.status_code == 202
        run_id = response.json()["run_id"]

        async def delivered() -> bool:
            return bool(named(exporter.get_finished_spans(), "deliver in-process"))

        await eventually(delivered, 30, "the in-process delivery's span")
        spans = exporter.get_finished_spans()

    api = one(spans, "POST /v1/full-review")
    publish = one(spans, "publish in-process")
    deliver = one(spans, "deliver in-process")
    claim = one(spans, "claim")
    assert parent_of(publish) == hex_span(api)
    assert publish.kind is SpanKind.PRODUCER
    assert parent_of(deliver) == hex_span(publish)
    assert deliver.kind is SpanKind.CONSUMER
    assert parent_of(claim) == hex_span(deliver)
    assert claim.attributes is not None and claim.attributes["run_id"] == run_id
    job = descendants(spans, api)
    assert len([s for s in job if s.name.startswith("step ")]) == len(STEP_NAMES)
    assert {hex_trace(s) for s in job} == {hex_trace(api)}


async def test_a_push_without_a_message_context_continues_the_request_trace(
    make_settings: Callable[..., Settings], llm: FakeOpenAI, exporter: InMemorySpanExporter
) -> None:
    async with app_with_spans(traced(make_settings), exporter) as (app, client):
        run = await services_of(app).store.create_run("A tool library for a street.", None)
        response = await client.post(
            "/pubsub/push",
            content=push_body(run.id, {"googclient_traceparent": "00-not-a-trace-01"}),
            # Marked "not sampled", as Cloud Run's front end marks most requests: that does not
            # veto the trace (TRACING_SAMPLE_RATIO decides, 1.0 here).
            headers={"traceparent": f"00-{FRONT_END_TRACE}-{FRONT_END_SPAN}-00"},
        )
        assert response.status_code == 204
        # Over the body limit: passed on untouched, refused by the route as before.
        limit = services_of(app).settings.push_max_body_bytes
        too_large = await client.post("/pubsub/push", content=b"x" * (limit + 1))
        assert too_large.status_code == 413
        spans = exporter.get_finished_spans()
    server = named(spans, "POST /pubsub/push")[0]
    assert hex_trace(server) == FRONT_END_TRACE
    assert parent_of(server) == FRONT_END_SPAN
    assert not server.links


async def test_tracing_on_without_google_credentials_refuses_to_start_with_a_clear_error(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    app = create_app(traced(make_settings))
    with pytest.raises(RuntimeError, match="TRACING_ENABLED=true exports to Cloud Trace"):
        async with app.router.lifespan_context(app):
            pass


async def test_push_answers_arriving_together_share_flushes() -> None:
    calls = 0

    def flush(bound: float) -> bool:
        nonlocal calls
        calls += 1
        return True

    flusher = _Flusher(flush, 1.0)
    first = asyncio.ensure_future(flusher.flush())
    others = [asyncio.ensure_future(flusher.flush()) for _ in range(20)]
    await asyncio.gather(first, *others)
    # The first runs alone; the twenty that asked while it ran share the next one.
    assert calls == 2


# --- through the real Pub/Sub emulator ---------------------------------------------------------


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[PubSubEmulator]:
    server = PubSubEmulator(tmp_path / "emulator.log").start()
    try:
        yield server
    finally:
        server.stop()


@asynccontextmanager
async def served(app: FastAPI) -> AsyncIterator[str]:
    """`app` behind uvicorn on a loopback port, in this event loop (its spans stay here)."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    serving = asyncio.ensure_future(server.serve())

    async def started() -> bool:
        if serving.done():
            serving.result()
        return server.started

    try:
        await eventually(started, 30, "uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


async def test_the_trace_runs_from_the_api_request_through_pubsub_into_the_push_delivery(
    emulator: PubSubEmulator,
    make_settings: Callable[..., Settings],
    llm: FakeOpenAI,
    exporter: InMemorySpanExporter,
    store: RunStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = "jobs-traced"
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator.host)
    settings = traced(
        make_settings,
        pubsub_project_id=PROJECT,
        pubsub_topic=topic,
        pubsub_emulator_host=emulator.host,
    )
    app = create_app(settings, span_exporter=exporter)
    async with served(app) as url:
        emulator.create_push_topology(topic, f"{url}/pubsub/push")
        async with httpx2.AsyncClient(base_url=url, timeout=30) as client:
            response = await client.post("/v1/full-review", json={"idea": "A repair café finder."})
            assert response.status_code == 202
            run_id = response.json()["run_id"]

        async def delivered() -> bool:
            return bool(named(exporter.get_finished_spans(), "POST /pubsub/push"))

        await eventually(delivered, 60, "the push delivery's server span")
        spans = exporter.get_finished_spans()

    api = one(spans, "POST /v1/full-review")
    publish = one(spans, f"publish {topic}")
    delivery = one(spans, "POST /pubsub/push")
    assert parent_of(publish) == hex_span(api)
    assert publish.attributes is not None
    assert publish.attributes["messaging.message.id"]
    # The publish span and the delivery's spans share the trace: Pub/Sub carried the context
    # in the message attributes, and the delivery is the publish span's child.
    assert hex_trace(delivery) == hex_trace(publish) == hex_trace(api)
    assert parent_of(delivery) == hex_span(publish)
    claim = one(spans, "claim")
    assert parent_of(claim) == hex_span(delivery)
    assert claim.attributes is not None and claim.attributes["run_id"] == run_id
    steps = [s for s in spans if s.name.startswith("step ")]
    assert len(steps) == len(STEP_NAMES)
    assert {hex_trace(s) for s in (claim, *steps)} == {hex_trace(api)}
    run = await store.get_run(run_id)
    assert run is not None and run.status == "completed"
