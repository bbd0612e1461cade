"""Logs: Cloud Logging JSON in production, run ids and lifecycle events, no secrets."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import pytest
from loguru import logger

from app.logs import configure_logging, trace_context
from app.main import create_app
from app.settings import Settings
from tests.conftest import running_app, services_of
from tests.fakes.openai_server import FakeOpenAI
from tests.test_push_pipeline import push


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
