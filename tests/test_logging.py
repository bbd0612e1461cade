"""Logs: Cloud Logging JSON in production, run ids and lifecycle events, no secrets."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import pytest
from loguru import logger

from app.domain.personas import AGGREGATE_STEP, STEP_NAMES
from app.logs import configure_logging, trace_context
from app.main import create_app
from app.push.envelope import encode_wrapped
from app.settings import Settings
from tests.conftest import queued_an_hour_ago, running_app, services_of
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.test_push_pipeline import SUBSCRIPTION, push


@pytest.fixture
def production_logs(
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Switch to production logging; returns a function reading the JSON lines written."""

    def read() -> list[dict[str, Any]]:
        return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]

    configure_logging(True, "DEBUG", "my-project")
    try:
        yield read
    finally:
        configure_logging(False, "WARNING", None)


def test_production_lines_are_shaped_for_cloud_logging(
    production_logs: Callable[[], list[dict[str, Any]]],
) -> None:
    token = trace_context.set("105445aa7843bc8bf206b12000100000/1;o=1")
    try:
        with logger.contextualize(run_id="r-1"):
            logger.info("job started", lifecycle_event="job_started")
    finally:
        trace_context.reset(token)
    [line] = production_logs()
    assert line["severity"] == "INFO"
    assert line["message"] == "job started"
    assert line["run_id"] == "r-1"
    assert line["lifecycle_event"] == "job_started"
    assert line["logging.googleapis.com/trace"] == (
        "projects/my-project/traces/105445aa7843bc8bf206b12000100000"
    )
    assert "time" in line


def _refuse(token: str) -> None:
    raise PermissionError(f"refused a token of {len(token)} characters")


def test_development_tracebacks_leave_out_frame_locals(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(False, "DEBUG", None)
    try:
        token = "secret-token-value"
        try:
            _refuse(token)
        except PermissionError:
            logger.exception("request failed")
    finally:
        configure_logging(False, "WARNING", None)
    output = capsys.readouterr().err
    assert "PermissionError: refused a token of 18 characters" in output
    assert "_refuse(token)" in output
    assert "secret-token-value" not in output


async def test_a_run_logs_its_lifecycle_with_run_id_and_no_secrets(
    make_settings: Callable[..., Settings],
    llm: FakeOpenAI,
    production_logs: Callable[[], list[dict[str, Any]]],
) -> None:
    settings = make_settings(openai_api_key="sk-very-secret-key")
    async with running_app(settings) as (app, client):
        configure_logging(True, "DEBUG", "my-project")
        run = await services_of(app).store.create_run("A tool library.", None)
        assert (await push(client, {"run_id": run.id})).status_code == 204
        await client.post("/pubsub/push", content=b"{", headers={"authorization": "Bearer tok-123"})
    lines = production_logs()
    text = json.dumps(lines)
    assert "sk-very-secret-key" not in text
    assert "tok-123" not in text
    events = [line.get("lifecycle_event") for line in lines if line.get("run_id") == run.id]
    for event in ("job_started", "step_started", "step_completed", "job_completed"):
        assert event in events
    assert any(line.get("lifecycle_event") == "message_rejected" for line in lines)
    assert llm.calls()[0].headers["authorization"] == "Bearer sk-very-secret-key"


async def test_unhandled_error_answers_500_with_the_error_shape(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    app = create_app(settings)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaboom")

    async with app.router.lifespan_context(app):
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/boom", headers={"x-request-id": "req-500"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "req-500"
    assert response.json() == {
        "code": "internal_error",
        "message": "internal server error",
        "details": None,
        "request_id": "req-500",
        "detail": "internal server error",
    }


# The fields the monitoring queries, log-based metrics and runbook (infra/monitoring/,
# docs/OPERATIONS.md) read, by lifecycle event, with the JSON types they must have.
INT_OR_NULL = (int, type(None))
STR_OR_NULL = (str, type(None))
FLOAT_OR_NULL = (float, type(None))
DELIVERY_FIELDS: dict[str, Any] = {"delivery_attempt": INT_OR_NULL, "message_id": STR_OR_NULL}
RUN_TOTALS: dict[str, Any] = {
    "run_id": str,
    "lifecycle_event": str,
    "elapsed_time": float,
    **DELIVERY_FIELDS,
    "input_tokens": int,
    "output_tokens": int,
    "total_tokens": int,
    "cost_usd": FLOAT_OR_NULL,
    "run_type": str,
    "priority": str,
}
STEP_FIELDS: dict[str, Any] = {
    "run_id": str,
    "lifecycle_event": str,
    "step_name": str,
    "elapsed_time": float,
    "model": STR_OR_NULL,
    "input_tokens": int,
    "output_tokens": int,
    "total_tokens": int,
    "cost_usd": FLOAT_OR_NULL,
    "attempt": int,
    **DELIVERY_FIELDS,
}
EVENT_FIELDS: dict[str, dict[str, Any]] = {
    "job_completed": {**RUN_TOTALS, "decision": str, "overall_weighted_confidence": float},
    "job_failed": {**RUN_TOTALS, "error_message": str},
    "step_completed": STEP_FIELDS,
    "step_failed": {**STEP_FIELDS, "error_message": str},
    "idempotent_skip": {"run_id": str, "lifecycle_event": str, **DELIVERY_FIELDS},
}
# gpt-5.1 at the default prices: 100 input and 50 output tokens per call (the fake's usage).
CALL_COST = (100 * 1.25 + 50 * 10.0) / 1_000_000


def assert_fields(line: dict[str, Any]) -> None:
    """`line` carries every field its event promises, each of the promised JSON type."""
    for name, kind in EVENT_FIELDS[line["lifecycle_event"]].items():
        assert name in line, f"{line['lifecycle_event']} lacks {name}: {line}"
        value = line[name]
        # JSON has no int/float distinction for whole floats; bool is not a number here.
        assert not isinstance(value, bool), (name, value)
        assert isinstance(value, kind), f"{line['lifecycle_event']}.{name}={value!r}"


def events_of(lines: list[dict[str, Any]], run_id: str, event: str) -> list[dict[str, Any]]:
    return [x for x in lines if x.get("run_id") == run_id and x.get("lifecycle_event") == event]


async def test_lifecycle_lines_carry_the_fields_the_monitoring_reads(
    make_settings: Callable[..., Settings],
    llm: FakeOpenAI,
    production_logs: Callable[[], list[dict[str, Any]]],
) -> None:
    async with running_app(make_settings()) as (app, client):
        configure_logging(True, "DEBUG", "my-project")
        store = services_of(app).store
        ok = await store.create_run("A tool library.", None)
        failing = await store.create_run("A bike library.", None)

        async def deliver(run_id: str, message_id: str, attempt: int) -> None:
            body = encode_wrapped({"run_id": run_id}, message_id, SUBSCRIPTION, attempt)
            assert (await client.post("/pubsub/push", content=body)).status_code == 204

        await deliver(ok.id, "m-ok", 1)
        await deliver(ok.id, "m-dup", 2)
        llm.queue("review_critic", Reply(refusal="I cannot review this."))
        await deliver(failing.id, "m-fail", 3)
    lines = production_logs()

    [completed] = events_of(lines, ok.id, "job_completed")
    assert_fields(completed)
    assert completed["message_id"] == "m-ok" and completed["delivery_attempt"] == 1
    assert completed["decision"] == "approve"
    assert (completed["input_tokens"], completed["output_tokens"]) == (600, 300)
    assert completed["total_tokens"] == 900
    assert completed["cost_usd"] == pytest.approx(6 * CALL_COST)
    assert (completed["run_type"], completed["priority"]) == ("initial", "normal")
    assert completed["elapsed_time"] > 0

    steps = events_of(lines, ok.id, "step_completed")
    assert sorted(s["step_name"] for s in steps) == sorted(STEP_NAMES)
    for step in steps:
        assert_fields(step)
        assert step["message_id"] == "m-ok" and step["delivery_attempt"] == 1
        assert step["attempt"] == 1 and step["elapsed_time"] >= 0
        if step["step_name"] == AGGREGATE_STEP:
            assert (step["model"], step["total_tokens"], step["cost_usd"]) == (None, 0, 0.0)
        else:
            assert (step["model"], step["total_tokens"]) == ("gpt-5.1", 150)
            assert step["cost_usd"] == pytest.approx(CALL_COST)

    [skip] = events_of(lines, ok.id, "idempotent_skip")
    assert_fields(skip)
    assert (skip["message_id"], skip["delivery_attempt"]) == ("m-dup", 2)

    [step_failed] = events_of(lines, failing.id, "step_failed")
    assert_fields(step_failed)
    assert step_failed["step_name"] == "review_critic"
    assert "refused" in step_failed["error_message"]
    # The refusal's tokens were billed: the failed step says so.
    assert step_failed["total_tokens"] == 150
    assert step_failed["cost_usd"] == pytest.approx(CALL_COST)
    [job_failed] = events_of(lines, failing.id, "job_failed")
    assert_fields(job_failed)
    assert (job_failed["message_id"], job_failed["delivery_attempt"]) == ("m-fail", 3)
    assert "refused" in job_failed["error_message"]
    # expand and five reviews were called (the four others completed), all billed.
    assert job_failed["total_tokens"] == 900
    assert job_failed["cost_usd"] == pytest.approx(6 * CALL_COST)


async def test_a_run_failed_by_the_sweep_logs_the_same_fields(
    make_settings: Callable[..., Settings],
    llm: FakeOpenAI,
    production_logs: Callable[[], list[dict[str, Any]]],
) -> None:
    async with running_app(make_settings(worker_job_timeout_seconds=60)) as (app, _):
        configure_logging(True, "DEBUG", "my-project")
        services = services_of(app)
        run = await services.store.create_run("A tool library.", None)
        await queued_an_hour_ago(app, run)
        assert (await services.sweeper.sweep_once()).timed_out == 1
    [failed] = events_of(production_logs(), run.id, "job_failed")
    assert_fields(failed)
    assert failed["delivery_attempt"] is None and failed["message_id"] is None
    assert "job timeout" in failed["error_message"]
    assert failed["elapsed_time"] >= 3600
    assert (failed["total_tokens"], failed["cost_usd"]) == (0, 0.0)


async def test_a_run_failed_by_its_dead_letter_logs_the_same_fields(
    make_settings: Callable[..., Settings],
    llm: FakeOpenAI,
    production_logs: Callable[[], list[dict[str, Any]]],
) -> None:
    async with running_app(make_settings(worker_job_timeout_seconds=60)) as (app, client):
        configure_logging(True, "DEBUG", "my-project")
        services = services_of(app)
        run = await services.store.create_run("A tool library.", None)
        await queued_an_hour_ago(app, run)
        body = json.loads(encode_wrapped({"run_id": run.id}, "m-dead", SUBSCRIPTION))
        body["message"]["attributes"] = {"CloudPubSubDeadLetterSourceDeliveryCount": "5"}
        answer = await client.post("/pubsub/dead-letter", content=json.dumps(body).encode())
        assert answer.status_code == 204
    [failed] = events_of(production_logs(), run.id, "job_failed")
    assert_fields(failed)
    assert (failed["message_id"], failed["delivery_attempt"]) == ("m-dead", 5)
    assert "dead-lettered after 5 attempts" in failed["error_message"]
    assert (failed["run_type"], failed["total_tokens"], failed["cost_usd"]) == ("initial", 0, 0.0)


async def test_debug_mode_shows_statements_calls_and_summaries_but_no_text_or_secret(
    make_settings: Callable[..., Settings],
    llm: FakeOpenAI,
    production_logs: Callable[[], list[dict[str, Any]]],
) -> None:
    idea = "A lending shelf for power tools kept in the lobby."
    settings = make_settings(openai_api_key="sk-debug-secret", log_level="DEBUG")
    async with running_app(settings) as (app, client):
        configure_logging(True, "DEBUG", "my-project")
        run = await services_of(app).store.create_run(idea, {"budget": "tiny-secret-context"})
        assert (await push(client, {"run_id": run.id}, "msg-debug-1")).status_code == 204
    lines = [line for line in production_logs() if line["severity"] == "DEBUG"]

    statements = [line["message"] for line in lines if line["message"].startswith("sql: ")]
    assert any("UPDATE runs SET" in s for s in statements)
    assert any("INSERT INTO persona_reviews" in s for s in statements)
    requests = [line for line in lines if line["message"] == "llm request"]
    assert {line["step"] for line in requests} == set(STEP_NAMES) - {AGGREGATE_STEP}
    assert all(line["model"] == "gpt-5.1" and line["input_chars"] > 0 for line in requests)
    responses = [line for line in lines if line["message"] == "llm response"]
    assert len(responses) == 6 and all(line["output_tokens"] == 50 for line in responses)
    [summary] = [line for line in lines if line["message"] == "push message"]
    assert summary["message_id"] == "msg-debug-1" and summary["data_bytes"] > 0
    # Statements without their parameters, metadata without the prompt: nothing of the idea,
    # the context, the proposal or the key.
    text = json.dumps(lines)
    for secret in ("sk-debug-secret", "power tools", "tiny-secret-context", "household"):
        assert secret not in text
