"""The /v1 API: validation, the error shape, request ids, listing, health and readiness."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx2
from fastapi import FastAPI

from tests.conftest import running_app
from tests.fakes.openai_server import FakeOpenAI, Reply

AppClient = tuple[FastAPI, httpx2.AsyncClient]


def sentences(n: int) -> str:
    return " ".join(f"Sentence number {i} is here." for i in range(n))


async def wait_for_status(
    client: httpx2.AsyncClient, run_id: str, status: str, seconds: float = 20
) -> dict[str, Any]:
    for _ in range(int(seconds / 0.05)):
        data: dict[str, Any] = (await client.get(f"/v1/runs/{run_id}")).json()
        if data["status"] == status:
            return data
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} never reached {status}: {data['status']}")


def assert_error_shape(response: httpx2.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"code", "message", "details", "request_id", "detail"}
    assert body["detail"] == body["message"]
    assert body["code"] == code
    assert body["request_id"] == response.headers["x-request-id"]
    return body


async def test_ten_sentences_are_accepted_and_the_run_completes(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    _, client = app_client
    response = await client.post("/v1/full-review", json={"idea": sentences(10)})
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert body["run_type"] == "initial"
    assert body["priority"] == "normal"
    assert {"created_at", "queued_at", "message", "run_id"} <= set(body)
    run = await wait_for_status(client, body["run_id"], "completed")
    assert run["decision_label"] == "approve"


async def test_eleven_sentences_are_rejected(app_client: AppClient) -> None:
    _, client = app_client
    response = await client.post("/v1/full-review", json={"idea": sentences(11)})
    body = assert_error_shape(response, 422, "validation_error")
    assert "sentences" in str(body["details"])


async def test_idea_length_limits(app_client: AppClient) -> None:
    _, client = app_client
    too_long = await client.post("/v1/full-review", json={"idea": "a" * 10_001})
    assert_error_shape(too_long, 422, "validation_error")
    empty = await client.post("/v1/full-review", json={"idea": "   "})
    assert_error_shape(empty, 422, "validation_error")
    big_context = await client.post(
        "/v1/full-review", json={"idea": "An idea.", "extra_context": {"k": "v" * 50_001}}
    )
    assert_error_shape(big_context, 422, "validation_error")
    at_limit = await client.post("/v1/full-review", json={"idea": "a" * 10_000})
    assert at_limit.status_code == 202


async def test_unknown_run_is_404_with_the_error_shape(app_client: AppClient) -> None:
    _, client = app_client
    response = await client.get(f"/v1/runs/{uuid.uuid4()}")
    assert_error_shape(response, 404, "not_found")


async def test_request_id_is_echoed_or_generated(app_client: AppClient) -> None:
    _, client = app_client
    echoed = await client.get("/health", headers={"x-request-id": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    generated = await client.get("/health")
    assert len(generated.headers["x-request-id"]) == 32


async def test_list_runs_newest_first_with_filters(app_client: AppClient, llm: FakeOpenAI) -> None:
    _, client = app_client
    ids = []
    for i in range(3):
        response = await client.post("/v1/full-review", json={"idea": f"Idea number {i}."})
        ids.append(response.json()["run_id"])
    for run_id in ids:
        await wait_for_status(client, run_id, "completed")

    page = (await client.get("/v1/runs", params={"limit": 2})).json()
    assert page["total"] == 3 and page["limit"] == 2 and page["offset"] == 0
    assert [r["run_id"] for r in page["runs"]] == [ids[2], ids[1]]
    rest = (await client.get("/v1/runs", params={"limit": 2, "offset": 2})).json()
    assert [r["run_id"] for r in rest["runs"]] == [ids[0]]
    approved = (await client.get("/v1/runs", params={"decision": "approve"})).json()
    assert approved["total"] == 3
    failed = (await client.get("/v1/runs", params={"status": "failed"})).json()
    assert failed["total"] == 0
    bad = await client.get("/v1/runs", params={"status": "sleeping"})
    assert_error_shape(bad, 422, "validation_error")


async def test_health_and_ready(app_client: AppClient) -> None:
    _, client = app_client
    health = await client.get("/health")
    assert health.json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"


async def test_ready_is_503_and_work_refused_when_schema_is_behind(
    make_settings: Any, tmp_path: Any
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/empty.db"
    settings = make_settings(database_url=url, db_auto_migrate=False)
    async with running_app(settings, clean=False) as (_, client):
        ready = await client.get("/ready")
        assert_error_shape(ready, 503, "schema_behind")
        submit = await client.post("/v1/full-review", json={"idea": "An idea."})
        assert_error_shape(submit, 503, "schema_behind")
        assert (await client.get("/health")).status_code == 200


async def test_in_process_delivery_redelivers_after_a_transient_failure(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    _, client = app_client
    llm.queue("expand", *[Reply(503)] * 4)
    response = await client.post("/v1/full-review", json={"idea": "A bike repair café."})
    run = await wait_for_status(client, response.json()["run_id"], "completed")
    assert run["delivery_count"] == 2
    expand = next(s for s in run["step_progress"] if s["step_name"] == "expand")
    assert expand["attempts"] == 5


WEB_APP = "http://localhost:5173"


async def test_cors_lets_an_allowed_origin_call_the_api_from_a_browser(
    make_settings: Any, llm: FakeOpenAI
) -> None:
    settings = make_settings(cors_origins=f"{WEB_APP}, https://app.example.com")
    async with running_app(settings) as (_, client):
        preflight = await client.options(
            "/v1/full-review",
            headers={
                "origin": WEB_APP,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type,x-schema-version",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == WEB_APP
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "x-schema-version" in preflight.headers["access-control-allow-headers"].lower()

        submitted = await client.post(
            "/v1/full-review", json={"idea": "A seed library."}, headers={"origin": WEB_APP}
        )
        assert submitted.status_code == 202
        assert submitted.headers["access-control-allow-origin"] == WEB_APP
        # The web app reads X-Request-ID, so it must be exposed to scripts.
        assert "x-request-id" in submitted.headers["access-control-expose-headers"].lower()

        # Errors are readable too, and another origin gets no grant.
        missing = await client.get(f"/v1/runs/{uuid.uuid4()}", headers={"origin": WEB_APP})
        assert missing.status_code == 404
        assert missing.headers["access-control-allow-origin"] == WEB_APP
        other = await client.get("/v1/runs", headers={"origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


async def test_without_cors_origins_no_browser_origin_is_granted(app_client: AppClient) -> None:
    _, client = app_client
    preflight = await client.options(
        "/v1/runs", headers={"origin": WEB_APP, "access-control-request-method": "GET"}
    )
    assert preflight.status_code == 405
    assert "access-control-allow-origin" not in preflight.headers


async def test_list_runs_reference_filters_and_fields(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    _, client = app_client
    llm.scores.update({"critic": 0.3})
    low = (await client.post("/v1/full-review", json={"idea": "Low idea."})).json()["run_id"]
    low_run = await wait_for_status(client, low, "completed")
    llm.scores.clear()
    high = (await client.post("/v1/full-review", json={"idea": "High idea."})).json()["run_id"]
    await wait_for_status(client, high, "completed")
    child = (
        await client.post(f"/v1/runs/{high}/revisions", json={"edited_proposal": {"title": "T"}})
    ).json()["run_id"]
    await wait_for_status(client, child, "completed")

    async def listed(**params: Any) -> list[str]:
        response = await client.get("/v1/runs", params=params)
        assert response.status_code == 200, response.text
        return [r["run_id"] for r in response.json()["runs"]]

    assert await listed(run_type="revision") == [child]
    assert await listed(run_type="initial") == [high, low]
    assert await listed(parent_run_id=high) == [child]
    assert await listed(parent_run_id=str(uuid.uuid4())) == []
    assert await listed(min_confidence=0.8) == [child, high]
    assert await listed(min_confidence=0.0) == [child, high, low]
    created = low_run["created_at"]
    assert await listed(start_date=created, end_date=created) == [low]
    assert await listed(end_date=created) == [low]
    # The same wall-clock time one hour west is an hour later: the low run is before it.
    west = datetime.fromisoformat(created).replace(tzinfo=timezone(timedelta(hours=-1)))
    assert low not in await listed(start_date=west.isoformat())
    assert await listed(run_type="revision", min_confidence=0.99) == []

    item = (await client.get("/v1/runs", params={"run_type": "revision"})).json()["runs"][0]
    assert item["parent_run_id"] == high
    assert item["proposal_title"] == "T"
    assert item["proposal_summary"] == "A list a household edits together."
    assert item["run_type"] == "revision" and item["retry_count"] == 0

    for params in (
        {"run_type": "full_review"},
        {"parent_run_id": "not-a-uuid"},
        {"min_confidence": "1.5"},
        {"min_confidence": "-0.1"},
        {"min_confidence": "nan"},
        {"min_confidence": "high"},
        {"start_date": "2026-01-01T00:00:00"},  # no timezone
        {"end_date": "yesterday"},
        {"status": "done"},
        {"runtype": "revision"},  # a misspelt filter is not ignored
    ):
        response = await client.get("/v1/runs", params=params)
        assert_error_shape(response, 422, "validation_error")


async def test_run_detail_carries_what_the_reference_clients_read(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    _, client = app_client
    llm.blocking.update({"critic": [{"text": "No budget", "security_critical": False}]})
    llm.scores.update({"critic": 0.5})
    run_id = (await client.post("/v1/full-review", json={"idea": "An idea."})).json()["run_id"]
    run = await wait_for_status(client, run_id, "completed")

    reviews = {r["persona_id"]: r for r in run["persona_reviews"]}
    assert reviews["critic"]["blocking_issues_present"] is True
    assert reviews["critic"]["security_concerns_present"] is False
    assert reviews["architect"]["blocking_issues_present"] is False
    decision = run["decision"]
    assert decision["weighted_confidence"] == decision["overall_weighted_confidence"]
    breakdown = decision["detailed_score_breakdown"]
    assert breakdown["weights"]["architect"] == 0.25
    assert breakdown["individual_scores"]["critic"] == 0.5
    assert breakdown["weighted_contributions"]["critic"] == 0.125
    [report] = decision["minority_reports"]
    assert report["persona_id"] == "critic" and report["persona_name"] == "Critic"
    assert report["confidence_score"] == 0.5
    assert report["blocking_summary"] == "No budget"
    assert report["mitigation_recommendation"] == "critic recommends a pilot"
    assert run["parent_run_id"] is None and run["run_type"] == "initial"
    assert run["model"] == "gpt-5.1" and run["temperature"] == 0.2
    assert run["retry_count"] == 0
    assert run["schema_version"] == "1.0.0" and run["prompt_set_version"] == "1.0.0"
