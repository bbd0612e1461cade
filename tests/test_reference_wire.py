"""What the reference project's clients send and read on the wire: they work against us unchanged.

Its publisher (consensus-engine `src/consensus_engine/clients/pubsub.py`) publishes
`{run_id, run_type, priority, payload}`; the run is the job's identity, so a delivery that carries
no message id still runs it (once: the run's lease sees to that). Its clients read `detail` in
error bodies, where FastAPI's default puts the message.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI

from app.publish import Outbox
from app.settings import Settings
from app.store.recovery import RecoveryStore
from app.store.runs import RunStatus
from tests.conftest import running_app, services_of
from tests.fakes.openai_server import FakeOpenAI

AppClient = tuple[FastAPI, httpx2.AsyncClient]

SUBSCRIPTION = "projects/p/subscriptions/consensus-engine-jobs-sub"
IDEA = "A tool library for neighbours. Members lend drills and ladders."
EXTRA_CONTEXT = {"budget": "small"}

# How a job reaches /pubsub/push: a wrapped envelope or the bare data (`no_wrapper`), with or
# without the message id Pub/Sub would add.
WIRE_FORMS = [
    "wrapped",
    "wrapped without messageId",
    "no_wrapper",
    "no_wrapper without message id",
]


class RecordingPublisher:
    """Stands in for the queue: records the runs `POST /v1/full-review` published; the tests
    deliver them as the reference's publisher would have."""

    def __init__(self) -> None:
        self.run_ids: list[str] = []

    async def publish(self, job: Any) -> None:
        # A run id or a job carrying one (the publisher's argument, whichever it is).
        self.run_ids.append(str(getattr(job, "run_id", job)))

    async def aclose(self) -> None:
        return None


def record_publishes(app: FastAPI) -> RecordingPublisher:
    services = services_of(app)
    publisher = RecordingPublisher()
    services.outbox = Outbox(RecoveryStore(services.engine), publisher)
    return publisher


def reference_job(run_id: str, **overrides: Any) -> dict[str, Any]:
    """The message data the reference's PubSubPublisher.publish sends for a full review."""
    job: dict[str, Any] = {
        "run_id": run_id,
        "run_type": "initial",
        "priority": "normal",
        "payload": {
            "idea": IDEA,
            "extra_context": EXTRA_CONTEXT,
            "parameters": {
                "expand_model": "gpt-5.1",
                "expand_temperature": 0.7,
                "review_model": "gpt-5.1",
                "review_temperature": 0.2,
                "persona_template_version": "1.0",
                "max_retries_per_persona": 3,
            },
        },
    }
    job.update(overrides)
    return job


def on_the_wire(job: dict[str, Any], form: str, message_id: str = "ref-1") -> dict[str, Any]:
    """Keyword arguments of `client.post` delivering `job` in `form` (see WIRE_FORMS)."""
    data = json.dumps(job).encode()
    if form.startswith("wrapped"):
        message: dict[str, Any] = {
            "data": base64.b64encode(data).decode(),
            "attributes": {"run_id": job.get("run_id", "")},
            "publishTime": "2024-01-01T00:00:00Z",
        }
        if form == "wrapped":
            message["messageId"] = message_id
        return {"content": json.dumps({"message": message, "subscription": SUBSCRIPTION})}
    headers = {"x-goog-pubsub-subscription-name": SUBSCRIPTION}
    if form == "no_wrapper":
        headers["x-goog-pubsub-message-id"] = message_id
    return {"content": data, "headers": headers}


async def submit(client: httpx2.AsyncClient, publisher: RecordingPublisher) -> str:
    response = await client.post(
        "/v1/full-review", json={"idea": IDEA, "extra_context": EXTRA_CONTEXT}
    )
    assert response.status_code == 202, response.text
    run_id: str = response.json()["run_id"]
    assert publisher.run_ids[-1] == run_id
    return run_id


async def run_status(client: httpx2.AsyncClient, run_id: str) -> str:
    response = await client.get(f"/v1/runs/{run_id}")
    assert response.status_code == 200, response.text
    status: str = response.json()["status"]
    return status


# --- the reference's jobs ---------------------------------------------------------------------


@pytest.mark.parametrize("form", WIRE_FORMS)
async def test_reference_job_runs_the_run_created_by_the_api(
    app_client: AppClient, llm: FakeOpenAI, form: str
) -> None:
    app, client = app_client
    publisher = record_publishes(app)
    run_id = await submit(client, publisher)
    assert await run_status(client, run_id) == RunStatus.QUEUED

    response = await client.post("/pubsub/push", **on_the_wire(reference_job(run_id), form))

    assert response.status_code == 204, response.text
    assert await run_status(client, run_id) == RunStatus.COMPLETED
    assert len(llm.calls()) == 6
    assert await services_of(app).store.list_quarantined(10, 0) == []


@pytest.mark.parametrize("form", ["wrapped without messageId", "no_wrapper without message id"])
async def test_redelivery_without_message_id_is_a_duplicate(
    app_client: AppClient, llm: FakeOpenAI, form: str
) -> None:
    """Without a message id the run is the identity: a second delivery does not run it again."""
    app, client = app_client
    run_id = await submit(client, record_publishes(app))
    job = reference_job(run_id)

    first = await client.post("/pubsub/push", **on_the_wire(job, form))
    second = await client.post("/pubsub/push", **on_the_wire(job, form))

    assert (first.status_code, second.status_code) == (204, 204)
    assert await run_status(client, run_id) == RunStatus.COMPLETED
    assert len(llm.calls()) == 6


async def test_payload_is_informational_the_run_row_decides(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    app, client = app_client
    run_id = await submit(client, record_publishes(app))
    job = reference_job(
        run_id, run_type="revision", priority="high", payload={"idea": "Something else."}
    )

    response = await client.post("/pubsub/push", **on_the_wire(job, "wrapped without messageId"))

    assert response.status_code == 204, response.text
    run = (await client.get(f"/v1/runs/{run_id}")).json()
    assert run["status"] == RunStatus.COMPLETED
    assert run["input_idea"] == IDEA
    expand_request = json.dumps(llm.calls("expand")[0].body)
    assert "tool library" in expand_request and "Something else" not in expand_request


BAD_REFERENCE_FIELDS: dict[str, dict[str, Any]] = {
    "run_type of our old name": {"run_type": "full_review"},
    "run_type null": {"run_type": None},
    "run_type a list": {"run_type": ["initial"]},
    "priority unknown": {"priority": "urgent"},
    "priority in capitals": {"priority": "HIGH"},
    "priority a number": {"priority": 1},
    "payload a string": {"payload": json.dumps({"idea": IDEA})},
    "payload a list": {"payload": [IDEA]},
    "payload null": {"payload": None},
}


@pytest.mark.parametrize("form", ["wrapped", "wrapped without messageId"])
@pytest.mark.parametrize(
    "bad", BAD_REFERENCE_FIELDS.values(), ids=list(BAD_REFERENCE_FIELDS.keys())
)
async def test_reference_job_with_a_bad_field_is_quarantined(
    app_client: AppClient, llm: FakeOpenAI, bad: dict[str, Any], form: str
) -> None:
    app, client = app_client
    run_id = await submit(client, record_publishes(app))
    request = on_the_wire(reference_job(run_id, **bad), form)

    response = await client.post("/pubsub/push", **request)

    assert response.status_code == 204, response.text
    [row] = await services_of(app).store.list_quarantined(10, 0)
    (field,) = bad
    assert row.reason.startswith(field)
    assert row.raw_body == request["content"].encode()
    assert row.message_id == ("ref-1" if form == "wrapped" else None)
    assert await run_status(client, run_id) == RunStatus.QUEUED
    assert llm.calls() == []


@pytest.mark.parametrize("form", ["wrapped without messageId", "no_wrapper without message id"])
async def test_self_contained_job_without_message_id_is_still_quarantined(
    app_client: AppClient, llm: FakeOpenAI, form: str
) -> None:
    """An `{idea}` job's run is found again by its message id: without one it cannot be run
    exactly once."""
    app, client = app_client

    response = await client.post("/pubsub/push", **on_the_wire({"idea": IDEA}, form))

    assert response.status_code == 204, response.text
    [row] = await services_of(app).store.list_quarantined(10, 0)
    assert "message id" in row.reason
    assert (await client.get("/v1/runs")).json()["total"] == 0
    assert llm.calls() == []


# --- `detail` in error bodies -----------------------------------------------------------------


def assert_reference_error(response: httpx2.Response, status: int, code: str) -> None:
    """Our error shape, and the `detail` the reference's clients read, equal to the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "details", "request_id", "detail"}
    assert body["code"] == code
    assert isinstance(body["detail"], str) and body["detail"] == body["message"]
    assert body["request_id"] == response.headers["x-request-id"]


async def test_v1_errors_carry_detail(app_client: AppClient) -> None:
    _, client = app_client
    missing = await client.get("/v1/runs/6f1c1f4e-0000-4000-8000-000000000001")
    assert_reference_error(missing, 404, "not_found")
    invalid = await client.post("/v1/full-review", json={"idea": ""})
    assert_reference_error(invalid, 422, "validation_error")
    unparsable = await client.post(
        "/v1/full-review", content=b"{", headers={"content-type": "application/json"}
    )
    assert 400 <= unparsable.status_code < 500
    assert_reference_error(unparsable, unparsable.status_code, unparsable.json()["code"])


async def test_push_errors_carry_detail(app_client: AppClient) -> None:
    app, client = app_client
    limit = services_of(app).settings.push_max_body_bytes
    too_large = await client.post("/pubsub/push", content=b" " * (limit + 1))
    assert_reference_error(too_large, 413, "payload_too_large")


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def unsigned_token(key_id: str) -> str:
    """A JWT whose header names an RS256 key: verifying it needs the certificates."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256', 'kid': key_id, 'typ': 'JWT'})}.{part({})}.c2ln"


async def test_push_auth_errors_carry_detail(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    settings = make_settings(
        push_auth="oidc",
        push_audience="https://ce.example.com/pubsub/push",
        push_service_accounts="pusher@p.iam.gserviceaccount.com",
        push_oidc_certs_url=f"http://127.0.0.1:{unused_port()}/certs",
    )
    async with running_app(settings) as (_, client):
        body = on_the_wire(reference_job("6f1c1f4e-0000-4000-8000-000000000001"), "wrapped")
        anonymous = await client.post("/pubsub/push", **body)
        assert_reference_error(anonymous, 401, "unauthorized")
        headers = {"authorization": f"Bearer {unsigned_token('k-1')}"}
        no_certs = await client.post("/pubsub/push", headers=headers, **body)
        assert_reference_error(no_certs, 503, "auth_unavailable")
    assert llm.calls() == []


async def test_openapi_error_body_documents_detail(app_client: AppClient) -> None:
    _, client = app_client
    schema = (await client.get("/openapi.json")).json()["components"]["schemas"]["ErrorBody"]
    assert schema["properties"]["detail"]["type"] == "string"
    assert "detail" in schema["required"]
