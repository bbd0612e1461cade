"""The run viewer's pages, in-process on PostgreSQL with the fake OpenAI server.

What a person submits goes through the API's validation and enqueue; what the model wrote is
shown escaped; the security headers are on every answer; lists filter and page as /v1 does.
The live page in a real browser is tests/test_ui_browser.py.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from html.parser import HTMLParser
from typing import Any

import httpx2
import markupsafe
import pytest

from app.domain.personas import PERSONAS
from app.settings import Settings
from app.ui import CONTENT_SECURITY_POLICY
from tests.conftest import running_app
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.test_api import sentences, wait_for_status

SCRIPT = "<script>alert(1)</script>"
IMG = '<img src=x onerror="alert(2)">'
UiClient = httpx2.AsyncClient


class Elements(HTMLParser):
    """Start tags (with attributes) of a page, for the few structural checks below."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [
            a
            for t, a in self.tags
            if t == tag and all(a.get(k.rstrip("_")) == v for k, v in attrs.items())
        ]


@pytest.fixture
async def ui(make_settings: Callable[..., Settings], llm: FakeOpenAI) -> AsyncIterator[UiClient]:
    async with running_app(make_settings(ui_enabled=True)) as (_, client):
        yield client


def form(**fields: str) -> dict[str, Any]:
    """What a browser sends for a plain HTML form post from this site."""
    return {
        "content": httpx2.QueryParams(fields).__str__().encode(),
        "headers": {
            "content-type": "application/x-www-form-urlencoded",
            "origin": "http://testserver",
        },
    }


async def submit(client: UiClient, idea: str, **fields: str) -> str:
    """Submit through the page's form; the new run's id from the redirect."""
    response = await client.post("/", **form(idea=idea, **fields))
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    assert re.fullmatch(r"/runs/[0-9a-f-]{36}", location), location
    return location.rsplit("/", 1)[1]


async def api_message(client: UiClient, body: dict[str, Any]) -> str:
    """The message the API gives for this submission."""
    response = await client.post("/v1/full-review", json=body)
    assert response.status_code == 422
    message: str = response.json()["details"][0]["msg"]
    return message


def escaped(text: str) -> str:
    """`text` as the templates write it into HTML."""
    return str(markupsafe.escape(text))


async def test_submit_lands_on_the_run_page_which_shows_the_result(
    ui: UiClient, llm: FakeOpenAI
) -> None:
    page = await ui.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<label for="idea">' in page.text and 'lang="en"' in page.text
    assert "<script>" not in page.text and " on" + "click=" not in page.text

    run_id = await submit(ui, "A shared grocery list. Members see who buys what.")
    run = await wait_for_status(ui, run_id, "completed")
    assert run["priority"] == "normal" and run["run_type"] == "initial"

    detail = await ui.get(f"/runs/{run_id}")
    assert detail.status_code == 200
    html = detail.text
    tags = Elements(html)
    assert len(tags.find("tr", class_="step step--completed")) == 7
    assert len(tags.find("article", class_="review")) == 5
    for persona in PERSONAS:
        assert f">{persona.name}</h3>" in html
    assert "architect recommends a pilot" in html  # a review's text
    assert '<span class="badge badge--approve">Approve</span>' in html
    assert 'data-live="off"' in html  # finished: app.js opens no stream
    assert f'href="/runs/{run_id}/revise"' in html
    assert len(tags.find("main")) == 1 and tags.find("a", class_="skip-link")

    listed = await ui.get("/runs")
    assert listed.status_code == 200
    assert f'href="/runs/{run_id}"' in listed.text
    assert "Shared grocery list" in listed.text


async def test_security_headers_on_pages_static_files_and_the_api(ui: UiClient) -> None:
    for path in ("/", "/runs", "/static/app.css", "/static/app.js", "/v1/runs", "/health"):
        response = await ui.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert response.headers["x-content-type-options"] == "nosniff", path
        assert response.headers["referrer-policy"] == "same-origin", path
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY
    js = await ui.get("/static/app.js")
    assert js.headers["content-type"].startswith(("text/javascript", "application/javascript"))


@pytest.mark.parametrize(
    ("idea", "expected"),
    [("   ", "idea must not be empty"), (sentences(11), "at most 10 sentences, got 11")],
)
async def test_submit_errors_are_shown_at_the_field_with_the_apis_message(
    ui: UiClient, idea: str, expected: str
) -> None:
    message = await api_message(ui, {"idea": idea})
    assert expected in message

    response = await ui.post("/", **form(idea=idea, extra_context="", priority="normal"))
    assert response.status_code == 422
    html = response.text
    textarea = Elements(html).find("textarea", id="idea")[0]
    assert textarea["aria-invalid"] == "true"
    assert textarea["aria-describedby"] == "idea-hint idea-error"
    error = re.search(r'<p id="idea-error" class="field-error">(.*?)</p>', html, re.S)
    assert error is not None and escaped(message) in error.group(1)
    assert (await ui.get("/v1/runs")).json()["total"] == 0  # nothing was queued


async def test_a_bad_priority_and_a_foreign_origin_are_refused(ui: UiClient) -> None:
    response = await ui.post("/", **form(idea="An idea.", priority="urgent"))
    assert response.status_code == 422
    assert Elements(response.text).find("select", id="priority")[0]["aria-invalid"] == "true"
    foreign = form(idea="An idea.")
    foreign["headers"]["origin"] = "https://evil.example"
    assert (await ui.post("/", **foreign)).status_code == 403
    crowded = form(idea="An idea.", **{f"field{n}": "x" for n in range(200)})
    assert (await ui.post("/", **crowded)).status_code == 413
    assert (await ui.get("/v1/runs")).json()["total"] == 0


async def test_model_output_is_shown_as_text(ui: UiClient, llm: FakeOpenAI) -> None:
    proposal = {
        "title": f"Title {SCRIPT}",
        "summary": f"Summary {IMG}",
        "problem_statement": "Problem.",
        "proposed_solution": f"Solution {SCRIPT}",
        "assumptions": [IMG],
        "scope_non_goals": [],
    }
    llm.queue("expand", Reply(raw_text=json.dumps(proposal)))
    llm.blocking["security_guardian"] = [{"text": f"Leak {IMG}", "security_critical": True}]
    llm.blocking["critic"] = [{"text": f"Breaks {SCRIPT}", "security_critical": False}]
    run_id = await submit(ui, "An idea with hostile output.", extra_context=SCRIPT)
    await wait_for_status(ui, run_id, "completed")

    for path in (f"/runs/{run_id}", f"/runs/{run_id}/sections", "/runs"):
        html = (await ui.get(path)).text
        assert "<script>alert" not in html, path
        assert "<img src=x" not in html, path
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html, path
    html = (await ui.get(f"/runs/{run_id}")).text
    assert "&lt;img src=x onerror=&#34;alert(2)&#34;&gt;" in html
    assert '<span class="tag tag--security">Security-critical</span> Leak &lt;img' in html
    # The only script on the page is the static file.
    assert re.findall(r"<script[^>]*>", html) == ['<script src="/static/app.js" defer>']


async def test_disabled_ui_serves_no_pages_and_no_static_files(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    async with running_app(make_settings(ui_enabled=False)) as (_, client):
        for path in ("/", "/runs", "/static/app.css", f"/runs/{uuid.uuid4()}", "/compare"):
            assert (await client.get(path)).status_code == 404, path
        api = await client.get("/v1/runs")
        assert api.status_code == 200
        assert "content-security-policy" not in api.headers


async def test_unknown_runs_are_a_404_page(ui: UiClient) -> None:
    for path in (
        f"/runs/{uuid.uuid4()}",
        "/runs/not-a-uuid",
        f"/runs/{uuid.uuid4()}/sections",
        f"/runs/{uuid.uuid4()}/revise",
    ):
        response = await ui.get(path)
        assert response.status_code == 404, path
        assert response.headers["content-type"].startswith("text/html"), path
        assert "<h1>Not found</h1>" in response.text


async def test_list_filters_and_pages_as_the_api_does(ui: UiClient, llm: FakeOpenAI) -> None:
    ids = [await submit(ui, f"Idea number {i}.") for i in range(3)]
    for run_id in ids:
        await wait_for_status(ui, run_id, "completed")

    def rows(html: str) -> list[str]:
        return re.findall(r'class="run-name"><a href="/runs/([0-9a-f-]+)"', html)

    first = await ui.get("/runs", params={"limit": "2", "status": "", "decision": ""})
    assert first.status_code == 200
    assert rows(first.text) == [ids[2], ids[1]]
    assert 'href="/runs?limit=2&amp;offset=2" rel="next"' in first.text
    assert 'rel="prev"' not in first.text
    second = await ui.get("/runs", params={"limit": "2", "offset": "2"})
    assert rows(second.text) == [ids[0]]
    assert 'href="/runs?limit=2&amp;offset=0" rel="prev"' in second.text
    assert 'rel="next"' not in second.text

    assert len(rows((await ui.get("/runs", params={"decision": "approve"})).text)) == 3
    assert rows((await ui.get("/runs", params={"status": "failed"})).text) == []
    assert rows((await ui.get("/runs", params={"min_confidence": "0.9"})).text) == []
    created = (await ui.get("/v1/runs", params={"limit": 1})).json()["runs"][0]["created_at"]
    day = created[:10]
    # A plain date, as <input type=date> sends it, covers that whole UTC day on either end.
    assert len(rows((await ui.get("/runs", params={"start_date": day})).text)) == 3
    assert len(rows((await ui.get("/runs", params={"end_date": day})).text)) == 3
    assert rows((await ui.get("/runs", params={"end_date": "2000-01-01"})).text) == []

    for name, value in (("status", "sleeping"), ("min_confidence", "2"), ("start_date", "x")):
        api = await ui.get("/v1/runs", params={name: value})
        assert api.status_code == 422
        message = api.json()["details"][0]["msg"]
        page = await ui.get("/runs", params={name: value})
        assert page.status_code == 422, name
        field = Elements(page.text).find("select" if name == "status" else "input", id=name)
        assert field[0]["aria-invalid"] == "true", name
        assert f'<p id="{name}-error" class="field-error">' in page.text
        assert escaped(message) in page.text, (name, message)


async def test_the_decision_chart_draws_each_contribution(ui: UiClient, llm: FakeOpenAI) -> None:
    scores = {
        "architect": 0.9,
        "critic": 0.4,
        "optimist": 0.95,
        "security_guardian": 0.7,
        "user_advocate": 0.6,
    }
    llm.scores.update(scores)
    llm.blocking["critic"] = [{"text": "No offline mode", "security_critical": False}]
    run_id = await submit(ui, "A chart of weighted opinions.")
    run = await wait_for_status(ui, run_id, "completed")
    html = (await ui.get(f"/runs/{run_id}")).text

    svg = re.search(r"<svg class=\"chart\".*?</svg>", html, re.S)
    assert svg is not None
    assert 'role="img"' in svg.group() and '<title id="chart-title">' in svg.group()
    assert "style=" not in svg.group()
    bars = {a["data-persona"]: a for a in Elements(svg.group()).find("rect")}
    assert set(bars) == {p.persona_id for p in PERSONAS} | {"overall"}
    contributions = {p.persona_id: p.weight * scores[p.persona_id] for p in PERSONAS}
    unit = float(bars["architect"]["width"]) / contributions["architect"]
    x = float(bars["architect"]["x"])
    for persona in PERSONAS:  # a waterfall: each bar starts where the previous one ended
        bar = bars[persona.persona_id]
        assert float(bar["width"]) == pytest.approx(contributions[persona.persona_id] * unit, 0.01)
        assert float(bar["x"]) == pytest.approx(x, abs=0.02)
        x += float(bar["width"])
    overall = run["overall_weighted_confidence"]
    assert float(bars["overall"]["width"]) == pytest.approx(overall * unit, 0.01)
    assert "revise ≥ 0.60" in svg.group() and "approve ≥ 0.80" in svg.group()
    assert f"Overall: {overall:.3f} (revise)" in svg.group()
    # On revise, the critic's blocking issue files a minority report.
    assert "<h3>Minority reports</h3>" in html and "<h4>Critic <span" in html


async def test_a_failed_run_shows_its_error_and_the_failed_step(
    ui: UiClient, llm: FakeOpenAI
) -> None:
    llm.queue("expand", Reply(refusal="I cannot help with <that>"))
    run_id = await submit(ui, "An idea the model refuses.")
    run = await wait_for_status(ui, run_id, "failed")
    html = (await ui.get(f"/runs/{run_id}")).text
    assert "The run failed" in html
    assert escaped(run["error_message"]) in html
    assert 'class="step step--failed" data-step="expand"' in html
    assert '<span class="badge badge--failed">Failed</span>' in html
    assert "Revise and re-run" not in html


async def test_the_sections_fragment_and_the_event_stream_alias(
    ui: UiClient, llm: FakeOpenAI
) -> None:
    run_id = await submit(ui, "A fragment to swap in.")
    await wait_for_status(ui, run_id, "completed")
    fragment = await ui.get(f"/runs/{run_id}/sections")
    assert fragment.status_code == 200
    assert fragment.headers["cache-control"] == "no-store"
    assert "<html" not in fragment.text and '<h2 id="progress-title">' in fragment.text
    replay = await ui.get(f"/runs/{run_id}/events")
    assert replay.status_code == 200
    assert replay.headers["content-type"].startswith("text/event-stream")
    assert replay.text.rstrip().endswith("}") and "event: run_completed" in replay.text
    last = re.findall(r"^id: (\d+)$", replay.text, re.M)[-1]
    # Nothing after the last event of a finished run: 204 tells EventSource to stop.
    done = await ui.get(f"/runs/{run_id}/events", headers={"last-event-id": last})
    assert done.status_code == 204


async def test_revise_then_compare_with_the_parent(ui: UiClient, llm: FakeOpenAI) -> None:
    llm.scores["critic"] = 0.5
    llm.blocking["user_advocate"] = [{"text": "No offline <mode>", "security_critical": False}]
    parent = await submit(ui, "A shared grocery list.")
    await wait_for_status(ui, parent, "completed")

    page = await ui.get(f"/runs/{parent}/revise")
    assert page.status_code == 200
    fields = Elements(page.text)
    assert fields.find("input", id="title")[0]["value"] == "Shared grocery list"
    prefilled = {
        "title": "Shared grocery list",
        "summary": "A list a household edits together.",
        "problem_statement": "Households forget items.",
        "proposed_solution": "A synced list with per-item owners.",
        "assumptions": "Members have phones",
        "scope_non_goals": "Payments",
    }
    nothing = await ui.post(f"/runs/{parent}/revise", **form(**prefilled, edit_notes=""))
    assert nothing.status_code == 422
    assert "give edited_proposal or edit_notes (or both)" in nothing.text
    emptied = await ui.post(
        f"/runs/{parent}/revise", **form(**{**prefilled, "title": " "}, edit_notes="")
    )
    assert emptied.status_code == 422
    assert Elements(emptied.text).find("input", id="title")[0]["aria-invalid"] == "true"

    llm.scores["critic"] = 0.9
    llm.blocking.clear()
    edited = {**prefilled, "title": "Grocery list by aisle", "assumptions": "Shops have aisles"}
    response = await ui.post(f"/runs/{parent}/revise", **form(**edited, edit_notes=""))
    assert response.status_code == 303, response.text
    child = response.headers["location"].rsplit("/", 1)[1]
    run = await wait_for_status(ui, child, "completed")
    assert run["parent_run_id"] == parent and run["proposal"]["title"] == "Grocery list by aisle"
    assert run["revision"]["edited_proposal"] == {
        "title": "Grocery list by aisle",
        "assumptions": ["Shops have aisles"],
    }

    html = (await ui.get(f"/runs/{child}")).text
    link = f'href="/compare?a={parent}&amp;b={child}"'
    assert link in html and "reused from" in html
    compared = await ui.get("/compare", params={"a": child, "b": parent})  # either order
    assert compared.status_code == 200
    text = compared.text
    assert '<del class="diff-line diff-del">-Shared grocery list</del>' in text
    assert '<ins class="diff-line diff-add">+Grocery list by aisle</ins>' in text
    assert "+0.40" in text  # the critic's confidence, 0.50 -> 0.90
    resolved = "\N{MINUS SIGN} resolved: No offline &lt;mode&gt;"
    assert f'<p class="issue issue--resolved">{resolved}</p>' in text

    same = await ui.get("/compare", params={"a": parent, "b": parent})
    assert same.status_code == 400 and "cannot diff a run against itself" in same.text
    missing = await ui.get("/compare", params={"a": parent, "b": str(uuid.uuid4())})
    assert missing.status_code == 404
    assert Elements(missing.text).find("input", id="b")[0]["aria-invalid"] == "true"
    assert (await ui.get("/compare")).status_code == 200


async def test_only_a_completed_run_can_be_revised(ui: UiClient, llm: FakeOpenAI) -> None:
    llm.queue("expand", Reply(refusal="no"))
    run_id = await submit(ui, "A run that fails.")
    await wait_for_status(ui, run_id, "failed")
    page = await ui.get(f"/runs/{run_id}/revise")
    assert page.status_code == 409
    assert "Only a completed run can be revised; this one is failed." in page.text
    assert '<form class="form" method="post"' not in page.text
    posted = await ui.post(f"/runs/{run_id}/revise", **form(title="New", edit_notes="more"))
    assert posted.status_code == 409
    assert f"run {run_id} is failed; only a completed run can be revised" in posted.text
