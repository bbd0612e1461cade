"""The push endpoint end to end: PostgreSQL, the real openai SDK, the fake LLM server over HTTP."""

from __future__ import annotations

import base64
import email.utils
import json
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI

from app.domain.personas import STEP_NAMES
from app.push.envelope import encode_wrapped
from app.settings import Settings
from app.store.recovery import DeadLetterRef, RecoveryStore, ReplayOutcome
from app.store.tables import QuarantinedMessage
from tests.conftest import running_app, services_of
from tests.fakes.openai_server import USAGE, FakeOpenAI, Reply

SUBSCRIPTION = "projects/test/subscriptions/consensus-engine-jobs-sub"
AppClient = tuple[FastAPI, httpx2.AsyncClient]


async def new_run(app: FastAPI, idea: str = "A shared grocery list app for households.") -> str:
    run = await services_of(app).store.create_run(idea, {"platform": "mobile"})
    return run.id


async def push(
    client: httpx2.AsyncClient, job: dict[str, Any], message_id: str | None = None
) -> httpx2.Response:
    body = encode_wrapped(job, message_id or uuid.uuid4().hex, SUBSCRIPTION)
    return await client.post("/pubsub/push", content=body)


async def run_json(client: httpx2.AsyncClient, run_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/runs/{run_id}")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def test_push_runs_pipeline_to_completed(app_client: AppClient, llm: FakeOpenAI) -> None:
    app, client = app_client
    run_id = await new_run(app)

    response = await push(client, {"run_id": run_id})

    assert response.status_code == 204
    run = await run_json(client, run_id)
    assert run["status"] == "completed"
    assert [s["step_name"] for s in run["step_progress"]] == list(STEP_NAMES)
    assert all(s["status"] == "completed" for s in run["step_progress"])
    assert all(s["attempts"] == 1 for s in run["step_progress"])
    assert run["decision_label"] == "approve"
    assert run["overall_weighted_confidence"] == 0.85
    assert run["proposal"]["title"] == "Shared grocery list"
    reviews = {r["persona_id"]: r for r in run["persona_reviews"]}
    assert set(reviews) == {
        "architect",
        "critic",
        "optimist",
        "security_guardian",
        "user_advocate",
    }
    assert reviews["critic"]["recommendations"] == ["critic recommends a pilot"]
    assert reviews["critic"]["concerns"] == [{"text": "critic worries", "is_blocking": False}]
    assert run["usage"] == {k: v * 6 for k, v in USAGE.items()}
    assert run["decision"]["breakdown"][0]["persona_id"] == "architect"
    assert len(llm.calls()) == 6


async def test_llm_requests_are_labelled_and_not_stored(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    app, client = app_client
    run_id = await new_run(app)
    assert (await push(client, {"run_id": run_id})).status_code == 204

    ids = sorted(call.client_request_id for call in llm.calls())
    assert ids == sorted(f"{run_id}/{step}/1" for step in STEP_NAMES[:-1])
    for call in llm.calls():
        assert call.path == "/v1/responses"
        assert call.body["store"] is False
        assert call.body["text"]["format"]["type"] == "json_schema"
        assert call.headers["authorization"] == "Bearer sk-test"
        assert "<data" in call.body["input"]
    expand = llm.calls("expand")[0]
    assert "mobile" in expand.body["input"]


async def test_scores_from_the_model_drive_the_decision(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    app, client = app_client
    llm.scores.update(
        architect=0.80, critic=0.70, optimist=0.90, security_guardian=0.75, user_advocate=0.85
    )
    run_id = await new_run(app)
    assert (await push(client, {"run_id": run_id})).status_code == 204
    run = await run_json(client, run_id)
    assert run["overall_weighted_confidence"] == 0.7875
    assert run["decision_label"] == "revise"


# Each form of the header, and when the retry may be sent given the 429's arrival time.
RetryAfter = Callable[[], tuple[dict[str, str], Callable[[float], float]]]


def _retry_after_seconds() -> tuple[dict[str, str], Callable[[float], float]]:
    return {"retry-after": "1"}, lambda refused_at: refused_at + 1.0


def _retry_after_date() -> tuple[dict[str, str], Callable[[float], float]]:
    # A whole second about 2 s ahead, so the date's one-second resolution loses nothing.
    when = math.ceil(time.time()) + 2
    return {"retry-after": email.utils.formatdate(when, usegmt=True)}, lambda _: when


def _retry_after_ms() -> tuple[dict[str, str], Callable[[float], float]]:
    return {"retry-after-ms": "800"}, lambda refused_at: refused_at + 0.8


@pytest.mark.parametrize(
    "retry_after",
    [_retry_after_seconds, _retry_after_date, _retry_after_ms],
    ids=["seconds", "http-date", "milliseconds"],
)
async def test_rate_limit_waits_for_retry_after_then_succeeds(
    make_settings: Callable[..., Settings], llm: FakeOpenAI, retry_after: RetryAfter
) -> None:
    async with running_app(make_settings(retry_max_backoff_seconds=5.0)) as (app, client):
        run_id = await new_run(app)
        headers, not_before = retry_after()
        llm.queue("review_critic", Reply(429, headers=headers))

        response = await push(client, {"run_id": run_id})

        assert response.status_code == 204
        run = await run_json(client, run_id)
    assert run["status"] == "completed"
    critic = next(s for s in run["step_progress"] if s["step_name"] == "review_critic")
    assert critic["attempts"] == 2
    assert critic["status"] == "completed"
    refused, retried = llm.calls("review_critic")
    assert [c.client_request_id.rsplit("/", 1)[1] for c in (refused, retried)] == ["1", "2"]
    # Sent no sooner than the server asked, and not much later (the jitter is tiny here).
    assert not_before(refused.at) <= retried.at < not_before(refused.at) + 0.5


async def test_server_errors_until_retries_exhausted_answer_503_and_keep_checkpoints(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    app, client = app_client
    llm.queue("review_optimist", *[Reply(500)] * 4)
    run_id = await new_run(app)

    response = await push(client, {"run_id": run_id})

    assert response.status_code == 503
    assert response.json()["code"] == "retry_later"
    run = await run_json(client, run_id)
    assert run["status"] == "running"
    assert run["lease_owner"] is None
    steps = {s["step_name"]: s for s in run["step_progress"]}
    assert steps["review_optimist"]["status"] == "failed"
    assert steps["review_optimist"]["attempts"] == 4
    assert "HTTP 500" in steps["review_optimist"]["error_message"]
    assert steps["expand"]["status"] == "completed"
    for persona in ("architect", "critic", "security_guardian", "user_advocate"):
        assert steps[f"review_{persona}"]["status"] == "completed"
    assert len(run["persona_reviews"]) == 4
    assert "HTTP 500" in run["error_message"]

    # The redelivery resumes: only the failed persona is called again.
    before = len(llm.calls())
    assert (await push(client, {"run_id": run_id})).status_code == 204
    assert [c.step for c in llm.calls()[before:]] == ["review_optimist"]
    assert (await run_json(client, run_id))["status"] == "completed"


async def test_garbage_output_is_retried_and_its_usage_counted(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    app, client = app_client
    llm.queue("expand", Reply(raw_text="this is not json"))
    run_id = await new_run(app)

    assert (await push(client, {"run_id": run_id})).status_code == 204

    run = await run_json(client, run_id)
    expand = next(s for s in run["step_progress"] if s["step_name"] == "expand")
    assert expand["attempts"] == 2
    assert expand["usage"]["total_tokens"] == 2 * USAGE["total_tokens"]
    assert run["usage"]["total_tokens"] == 7 * USAGE["total_tokens"]


async def test_refusal_fails_the_run_permanently(app_client: AppClient, llm: FakeOpenAI) -> None:
    app, client = app_client
    llm.queue("review_security_guardian", Reply(refusal="I can't help with that."))
    run_id = await new_run(app)

    response = await push(client, {"run_id": run_id})

    assert response.status_code == 204
    run = await run_json(client, run_id)
    assert run["status"] == "failed"
    assert "refused" in run["error_message"]
    assert len(llm.calls("review_security_guardian")) == 1


async def test_incomplete_response_is_retried(app_client: AppClient, llm: FakeOpenAI) -> None:
    app, client = app_client
    llm.queue("review_architect", Reply(raw_text='{"confidence', incomplete_reason="max_tokens"))
    run_id = await new_run(app)
    assert (await push(client, {"run_id": run_id})).status_code == 204
    run = await run_json(client, run_id)
    architect = next(s for s in run["step_progress"] if s["step_name"] == "review_architect")
    assert architect["attempts"] == 2


async def test_duplicate_delivery_of_completed_run_is_acknowledged_without_llm_calls(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    app, client = app_client
    run_id = await new_run(app)
    assert (await push(client, {"run_id": run_id})).status_code == 204
    calls = len(llm.calls())
    assert (await push(client, {"run_id": run_id})).status_code == 204
    assert len(llm.calls()) == calls


async def test_self_contained_job_maps_to_one_run_per_message(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    _, client = app_client
    job = {"idea": "A bike repair booking app.", "extra_context": "city of 50k people"}
    assert (await push(client, job, message_id="m-1")).status_code == 204
    assert (await push(client, job, message_id="m-1")).status_code == 204
    assert (await push(client, job, message_id="m-2")).status_code == 204

    listing = (await client.get("/v1/runs")).json()
    assert listing["total"] == 2
    assert {r["status"] for r in listing["runs"]} == {"completed"}
    assert len(llm.calls()) == 12


async def test_unwrapped_delivery_with_metadata_headers(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    _, client = app_client
    headers = {
        "x-goog-pubsub-message-id": "raw-1",
        "x-goog-pubsub-subscription-name": SUBSCRIPTION,
        "x-goog-pubsub-publish-time": "2026-11-28T00:00:00Z",
    }
    body = json.dumps({"idea": "A tool library for neighbours."}).encode()
    assert (await client.post("/pubsub/push", content=body, headers=headers)).status_code == 204
    assert (await client.post("/pubsub/push", content=body, headers=headers)).status_code == 204
    assert (await client.get("/v1/runs")).json()["total"] == 1


async def test_attribute_only_message_carries_the_job(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    app, client = app_client
    run_id = await new_run(app)
    envelope = {
        "message": {"attributes": {"run_id": run_id}, "message_id": "a-1", "publish_time": "x"},
        "subscription": SUBSCRIPTION,
    }
    assert (await client.post("/pubsub/push", json=envelope)).status_code == 204
    assert (await run_json(client, run_id))["status"] == "completed"


async def quarantined(app: FastAPI) -> list[QuarantinedMessage]:
    return list(await services_of(app).store.list_quarantined(100, 0))


async def test_malformed_envelope_is_acknowledged_and_quarantined(
    app_client: AppClient,
) -> None:
    app, client = app_client
    body = b'{"message": "not an object"'
    response = await client.post(
        "/pubsub/push", content=body, headers={"authorization": "Bearer secret"}
    )
    assert response.status_code == 204
    rows = await quarantined(app)
    assert len(rows) == 1
    assert rows[0].raw_body == body
    assert "authorization" not in rows[0].headers


async def test_undecodable_data_is_acknowledged_and_quarantined(app_client: AppClient) -> None:
    app, client = app_client
    envelope = {
        "message": {"data": "%%%not-base64%%%", "messageId": "bad-1"},
        "subscription": SUBSCRIPTION,
    }
    body = json.dumps(envelope).encode()
    assert (await client.post("/pubsub/push", content=body)).status_code == 204
    rows = await quarantined(app)
    assert len(rows) == 1
    assert rows[0].raw_body == body
    assert rows[0].message_id == "bad-1"
    assert "base64" in rows[0].reason


async def test_data_that_is_not_a_job_is_quarantined(app_client: AppClient) -> None:
    app, client = app_client
    cases = [
        base64.b64encode(b"\xff\xfe garbage").decode(),
        base64.b64encode(b'{"neither": 1}').decode(),
        base64.b64encode(b'{"run_id": "not-a-uuid"}').decode(),
        base64.b64encode(json.dumps({"idea": "Too many. " * 11}).encode()).decode(),
        base64.b64encode(json.dumps({"run_id": str(uuid.uuid4())}).encode()).decode(),
    ]
    for index, data in enumerate(cases):
        envelope = {"message": {"data": data, "messageId": f"j-{index}"}, "subscription": "s"}
        assert (await client.post("/pubsub/push", json=envelope)).status_code == 204
    reasons = [row.reason for row in reversed(await quarantined(app))]
    assert len(reasons) == len(cases)
    assert "unknown run_id" in reasons[-1]
    assert "sentences" in reasons[3]


async def test_body_over_the_cap_is_refused_before_parsing(
    make_settings: Any, llm: FakeOpenAI
) -> None:
    from tests.conftest import running_app

    async with running_app(make_settings(push_max_body_bytes=2048)) as (app, client):
        response = await client.post("/pubsub/push", content=b"x" * 4096)
        assert response.status_code == 413
        assert response.json()["code"] == "payload_too_large"
        assert await quarantined(app) == []


async def test_every_step_row_exists_before_the_run_starts(app_client: AppClient) -> None:
    app, _ = app_client
    run_id = await new_run(app)
    store = services_of(app).store
    run = await store.get_run(run_id)
    assert run is not None
    assert [(s.step_name, s.status) for s in run.steps] == [(n, "pending") for n in STEP_NAMES]


async def test_a_replayed_run_runs_on_an_instance_that_saw_it_fail(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    app, client = app_client
    store = services_of(app).store
    run_id = await new_run(app)
    claim = await store.claim(run_id, "elsewhere/1", 60, None)
    assert claim.outcome.value == "claimed"
    assert await store.fail(run_id, "elsewhere/1", "job timeout of 1800s exceeded")
    # This instance sees the failed run once (a duplicate delivery) ...
    assert (await push(client, {"run_id": run_id})).status_code == 204
    # ... then an operator replays it (python -m app.ops dead-letters --replay).
    replay = await RecoveryStore(services_of(app).engine).replay(
        run_id, [DeadLetterRef("dead-1", SUBSCRIPTION, 5)]
    )
    assert replay.outcome is ReplayOutcome.REPLAYED

    assert (await push(client, {"run_id": run_id})).status_code == 204

    run = await run_json(client, run_id)
    assert run["status"] == "completed"
    assert len(llm.calls()) == len(STEP_NAMES) - 1
