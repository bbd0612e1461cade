"""Two runs compared: the pure diff (`app/domain/diff.py`) and `GET /v1/runs/{a}/diff/{b}`."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx2
import schemathesis
from fastapi import FastAPI
from sqlalchemy import text

from app.domain.diff import (
    MAX_DIFF_LINES,
    ProposalChanges,
    ProposalMissing,
    RunSide,
    diff_runs,
    field_change,
    persona_deltas,
    proposal_changes,
    unified_diff,
)
from app.domain.models import PersonaReview
from tests.conftest import services_of
from tests.fakes.openai_server import FakeOpenAI, Reply

AppClient = tuple[FastAPI, httpx2.AsyncClient]

PROPOSAL: dict[str, Any] = {
    "title": "Shared grocery list",
    "summary": "A list a household edits together.",
    "problem_statement": "Households forget items.",
    "proposed_solution": "A synced list with per-item owners.",
    "assumptions": ["Members have phones", "Shops are nearby"],
    "scope_non_goals": ["Payments"],
}
T1 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
T2 = datetime(2025, 1, 2, 12, 0, tzinfo=UTC)


def review(
    persona_id: str,
    confidence: float,
    blocking: list[tuple[str, bool]] | None = None,
) -> PersonaReview:
    return PersonaReview(
        persona_id=persona_id,
        persona_name=persona_id.replace("_", " ").title(),
        confidence_score=confidence,
        strengths=[],
        concerns=[],
        blocking_issues=[
            {"text": text, "security_critical": critical} for text, critical in blocking or []
        ],
        recommendations=[],
        estimated_effort="small",
        dependency_risks=[],
    )


def side(run_id: str = "run-1", **overrides: Any) -> RunSide:
    values: dict[str, Any] = {"run_id": run_id, "created_at": T1, "status": "completed"}
    values.update(overrides)
    return RunSide(**values)


# --- proposal fields -----------------------------------------------------------------------


def test_each_field_is_unchanged_modified_added_or_removed() -> None:
    old = {**PROPOSAL, "title": "Grocery list", "summary": None}
    new = {k: v for k, v in PROPOSAL.items() if k != "scope_non_goals"}
    changes = proposal_changes(old, new)
    assert isinstance(changes, ProposalChanges)

    assert changes.problem_statement.status == "unchanged"
    assert changes.problem_statement.diff is None
    assert changes.problem_statement.old_value == changes.problem_statement.new_value

    title = changes.title
    assert title.status == "modified"
    assert (title.old_value, title.new_value) == ("Grocery list", "Shared grocery list")
    assert (title.old_length, title.new_length) == (12, 19)
    assert title.diff is not None and "-Grocery list\n" in title.diff
    assert "+Shared grocery list\n" in title.diff

    summary = changes.summary
    assert summary.status == "added"
    assert (summary.old_value, summary.new_value) == (None, PROPOSAL["summary"])
    assert summary.diff is None

    non_goals = changes.scope_non_goals
    assert non_goals.status == "removed"
    assert (non_goals.old_value, non_goals.new_value) == (["Payments"], None)


def test_list_fields_are_diffed_one_item_per_line() -> None:
    change = field_change(["Members have phones", "Shops are nearby"], ["Members have phones"])
    assert change.status == "modified"
    assert change.old_value == ["Members have phones", "Shops are nearby"]
    assert change.new_value == ["Members have phones"]
    assert change.diff == [
        "--- run1\n",
        "+++ run2\n",
        "@@ -1,2 +1 @@\n",
        " Members have phones\n",
        "-Shops are nearby\n",
    ]
    same = field_change(["a", "b"], ["a", "b"])
    assert same.status == "unchanged" and same.diff is None


def test_the_unified_diff_joins_into_the_diff_text_and_long_ones_are_cut() -> None:
    old = "\n".join(f"line {i}" for i in range(10))
    new = old.replace("line 5", "line five")
    text = "".join(unified_diff(old, new))
    assert text.startswith("--- run1\n+++ run2\n@@ -3,7 +3,7 @@\n")
    assert "-line 5\n+line five\n" in text
    assert " line 2\n" in text and " line 8\n" in text and "line 1\n" not in text

    long = unified_diff("\n".join(map(str, range(100))), "\n".join(map(str, range(100, 200))))
    assert len(long) == MAX_DIFF_LINES + 1
    assert long[-1] == "... (truncated 153 lines)\n"  # 3 header lines + 200 changed lines


def test_a_missing_proposal_is_named_by_side() -> None:
    assert proposal_changes(None, PROPOSAL) == ProposalMissing(status="run1_missing")
    assert proposal_changes(PROPOSAL, None) == ProposalMissing(status="run2_missing")
    assert proposal_changes(None, None) == ProposalMissing(status="both_missing")


# --- persona reviews -----------------------------------------------------------------------


def test_persona_deltas_name_the_blocking_issues_added_and_removed() -> None:
    old = [review("critic", 0.7, [("No tests", False), ("Stores passwords", True)])]
    new = [review("critic", 0.6, [("No tests", False), ("No rollback", False)])]
    [delta] = persona_deltas(old, new)
    assert delta.status == "in_both"
    assert (delta.old_confidence, delta.new_confidence) == (0.7, 0.6)
    assert delta.confidence_delta == -0.1
    assert (delta.old_blocking_issues, delta.new_blocking_issues) == (True, True)
    assert delta.blocking_changed is False
    assert (delta.old_security_concerns, delta.new_security_concerns) == (True, False)
    assert delta.security_concerns_changed is True
    assert delta.blocking_issues_added == ["No rollback"]
    assert delta.blocking_issues_removed == ["Stores passwords"]


def test_blocking_flag_changes_and_one_sided_personas() -> None:
    old = [review("critic", 0.9), review("optimist", 0.8)]
    new = [review("architect", 0.5), review("critic", 0.4, [("Breaks sync", True)])]
    deltas = {d.persona_id: d for d in persona_deltas(old, new)}
    assert list(deltas) == ["architect", "critic", "optimist"]  # the personas' own order

    critic = deltas["critic"]
    assert critic.blocking_changed is True and critic.security_concerns_changed is True
    assert critic.blocking_issues_added == ["Breaks sync"] and critic.blocking_issues_removed == []

    architect = deltas["architect"]
    assert architect.status == "added_in_run2"
    assert (architect.old_confidence, architect.new_confidence) == (None, 0.5)
    assert architect.confidence_delta is None and architect.blocking_changed is None
    assert architect.old_blocking_issues is None and architect.new_blocking_issues is False

    optimist = deltas["optimist"]
    assert optimist.status == "removed_in_run2"
    assert (optimist.old_confidence, optimist.new_confidence) == (0.8, None)
    assert optimist.security_concerns_changed is None


# --- the whole diff ------------------------------------------------------------------------


def test_metadata_tells_parent_from_child_and_unrelated_runs() -> None:
    parent = side("p")
    child = side("c", created_at=T2, parent_run_id="p")
    down = diff_runs(parent, child).metadata
    assert down.relationship == "run1_is_parent_of_run2" and down.is_parent_child
    assert (down.run1_id, down.run2_id, down.run1_created_at, down.run2_created_at) == (
        "p",
        "c",
        T1,
        T2,
    )
    assert (down.run_id, down.other_run_id, down.run_created_at, down.other_run_created_at) == (
        "p",
        "c",
        T1,
        T2,
    )
    assert down.parent_child_relationship == "run1_is_parent_of_run2"
    up = diff_runs(child, parent).metadata
    assert up.relationship == "run2_is_parent_of_run1" and up.is_parent_child
    other = diff_runs(child, side("x")).metadata
    assert other.relationship == "unrelated" and not other.is_parent_child
    assert other.parent_child_relationship is None


def test_decision_delta_of_two_decided_runs() -> None:
    old = side(decision_label="revise", overall_weighted_confidence=0.7)
    new = side("run-2", decision_label="approve", overall_weighted_confidence=0.85)
    delta = diff_runs(old, new).decision_delta
    assert delta.confidence_delta == 0.15
    assert (delta.old_decision_label, delta.new_decision_label) == ("revise", "approve")
    assert delta.decision_changed is True
    assert (delta.old_confidence, delta.new_confidence) == (0.7, 0.85)
    assert (delta.old_decision, delta.new_decision) == ("revise", "approve")
    zero = side("run-3", decision_label="reject", overall_weighted_confidence=0.0)
    assert diff_runs(zero, old).decision_delta.confidence_delta == 0.7


def test_runs_without_proposal_reviews_or_decision_diff_to_nulls() -> None:
    queued = side("q", status="queued")
    done = side(
        "d",
        proposal=PROPOSAL,
        reviews=[review("critic", 0.8)],
        decision_label="approve",
        overall_weighted_confidence=0.8,
    )
    result = diff_runs(done, queued)
    assert result.proposal_changes == ProposalMissing(status="run2_missing")
    [critic] = result.persona_deltas
    assert critic.status == "removed_in_run2" and critic.new_confidence is None
    decision = result.decision_delta
    assert decision.new_overall_weighted_confidence is None
    assert decision.confidence_delta is None
    assert decision.new_decision_label is None and decision.decision_changed is True
    assert (result.metadata.run1_status, result.metadata.run2_status) == ("completed", "queued")

    neither = diff_runs(queued, side("q2", status="failed"))
    assert neither.proposal_changes == ProposalMissing(status="both_missing")
    assert neither.persona_deltas == []
    assert neither.decision_delta.decision_changed is False


# --- the API -------------------------------------------------------------------------------


async def submit(client: httpx2.AsyncClient, idea: str) -> str:
    response = await client.post("/v1/full-review", json={"idea": idea})
    assert response.status_code == 202, response.text
    run_id: str = response.json()["run_id"]
    return run_id


async def wait_until(client: httpx2.AsyncClient, run_id: str, *statuses: str) -> None:
    for _ in range(400):
        if (await client.get(f"/v1/runs/{run_id}")).json()["status"] in statuses:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} never reached {statuses}")


def documented(app: FastAPI, response: httpx2.Response) -> dict[str, Any]:
    """The body, after checking it against the route's OpenAPI answer for its status."""
    schema = schemathesis.openapi.from_dict(app.openapi())
    schema["/v1/runs/{run_id}/diff/{other_run_id}"]["GET"].validate_response(response)
    body: dict[str, Any] = response.json()
    return body


def assert_error(app: FastAPI, response: httpx2.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = documented(app, response)
    assert body["code"] == code
    assert body["request_id"] == response.headers["x-request-id"]
    return body


async def test_two_completed_runs_compared(app_client: AppClient, llm: FakeOpenAI) -> None:
    app, client = app_client
    first = await submit(client, "A shared grocery list.")
    await wait_until(client, first, "completed")

    revised = {**PROPOSAL, "title": "Shared grocery list v2", "scope_non_goals": []}
    llm.queue("expand", Reply(raw_text=json.dumps(revised)))
    llm.scores["critic"] = 0.5
    llm.blocking["security_guardian"] = [
        {"text": "Lists leak to strangers", "security_critical": True}
    ]
    second = await submit(client, "A shared grocery list, again.")
    await wait_until(client, second, "completed")

    response = await client.get(f"/v1/runs/{first}/diff/{second}")
    assert response.status_code == 200, response.text
    body = documented(app, response)
    assert set(body) == {"metadata", "proposal_changes", "persona_deltas", "decision_delta"}

    metadata = body["metadata"]
    assert (metadata["run1_id"], metadata["run2_id"]) == (first, second)
    assert (metadata["run_id"], metadata["other_run_id"]) == (first, second)
    assert metadata["relationship"] == "unrelated" and metadata["is_parent_child"] is False
    assert metadata["run1_created_at"] < metadata["run2_created_at"]

    changes = body["proposal_changes"]
    assert changes["title"]["status"] == "modified"
    assert changes["title"]["old_value"] == "Shared grocery list"
    assert changes["title"]["new_value"] == "Shared grocery list v2"
    assert "+Shared grocery list v2\n" in changes["title"]["diff"]
    assert changes["summary"]["status"] == "unchanged"
    assert changes["assumptions"]["status"] == "modified"  # the fake's own has one item
    assert changes["scope_non_goals"]["diff"][-1] == "-Payments\n"

    deltas = {d["persona_id"]: d for d in body["persona_deltas"]}
    assert len(deltas) == 5
    assert deltas["critic"]["confidence_delta"] == -0.35
    assert deltas["architect"]["confidence_delta"] == 0.0
    guardian = deltas["security_guardian"]
    assert guardian["blocking_changed"] is True and guardian["security_concerns_changed"] is True
    assert guardian["blocking_issues_added"] == ["Lists leak to strangers"]

    decision = body["decision_delta"]
    assert (decision["old_decision_label"], decision["new_decision_label"]) == (
        "approve",
        "revise",
    )
    assert decision["decision_changed"] is True
    assert decision["confidence_delta"] < 0
    assert decision["old_confidence"] == decision["old_overall_weighted_confidence"]

    # As the web app asks: a revision (run_id) against its parent (other_run_id).
    async with services_of(app).engine.begin() as connection:
        await connection.execute(
            text("UPDATE runs SET parent_run_id = :parent WHERE id = :child"),
            {"parent": first, "child": second},
        )
    # Either way round, a parent and its revision read parent (old) -> revision (new).
    back = documented(app, await client.get(f"/v1/runs/{second}/diff/{first}"))
    assert back["metadata"]["run1_id"] == first and back["metadata"]["run2_id"] == second
    assert back["metadata"]["relationship"] == "run1_is_parent_of_run2"
    assert back["metadata"]["parent_child_relationship"] == "run1_is_parent_of_run2"
    assert back["decision_delta"]["confidence_delta"] == decision["confidence_delta"]


async def test_unfinished_and_failed_runs_are_compared_with_nulls(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    app, client = app_client
    queued = await services_of(app).store.create_run("Never delivered.", None)  # stays queued
    error = {"message": "too long", "type": "invalid_request_error", "code": "bad"}
    llm.queue("review_critic", Reply(400, body={"error": error}))
    failed = await submit(client, "A run that fails in review.")
    await wait_until(client, failed, "failed")

    response = await client.get(f"/v1/runs/{failed}/diff/{queued.id}")
    assert response.status_code == 200, response.text
    body = documented(app, response)
    assert (body["metadata"]["run1_status"], body["metadata"]["run2_status"]) == (
        "failed",
        "queued",
    )
    assert body["proposal_changes"] == {"status": "run2_missing"}
    assert all(d["status"] == "removed_in_run2" for d in body["persona_deltas"])
    assert "critic" not in {d["persona_id"] for d in body["persona_deltas"]}
    decision = body["decision_delta"]
    assert decision["old_decision_label"] is None and decision["new_decision_label"] is None
    assert decision["confidence_delta"] is None and decision["decision_changed"] is False


async def test_a_run_against_itself_is_400(app_client: AppClient) -> None:
    app, client = app_client
    run = await services_of(app).store.create_run("An idea.", None)
    same = await client.get(f"/v1/runs/{run.id}/diff/{run.id}")
    assert_error(app, same, 400, "same_run")
    spelled_apart = await client.get(f"/v1/runs/{run.id}/diff/{run.id.upper()}")
    assert_error(app, spelled_apart, 400, "same_run")


async def test_an_unknown_or_malformed_id_is_404_naming_which(app_client: AppClient) -> None:
    app, client = app_client
    run = await services_of(app).store.create_run("An idea.", None)
    missing = str(uuid.uuid4())

    second = assert_error(
        app, await client.get(f"/v1/runs/{run.id}/diff/{missing}"), 404, "not_found"
    )
    assert second["details"] == {"parameter": "other_run_id", "run_id": missing}
    first = assert_error(
        app, await client.get(f"/v1/runs/{missing}/diff/{run.id}"), 404, "not_found"
    )
    assert first["details"] == {"parameter": "run_id", "run_id": missing}
    malformed = assert_error(
        app, await client.get(f"/v1/runs/{run.id}/diff/not-a-uuid"), 404, "not_found"
    )
    assert malformed["details"] == {"parameter": "other_run_id"}
    assert "other_run_id" in malformed["message"]
