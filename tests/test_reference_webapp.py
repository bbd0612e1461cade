"""The reference project's own web app, served from another origin, driven in headless Chromium.

The real service (uvicorn, PostgreSQL, the real openai SDK against the fake OpenAI server) with
CORS_ORIGINS set to the web app's origin; the web app built by scripts/reference_webapp.sh
against it and served on another port. As a person would: submit an idea, watch the seven steps
reach a decision with its minority report, revise and re-run, watch the revision, compare it
with its parent. Screenshots of each stage go to .artifacts/webapp/ (FAILED-*.png where a stage
failed), with the app's, the web server's and the browser's logs.

Needs npm (the npm registry) and Chromium (Debian's package); skips loudly where either is
missing, fails instead under CI=true (.ci/run installs Chromium).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Locator, Page, async_playwright, expect

from app.store.runs import RunStore
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.procs import ROOT, AppProcess, free_port
from tests.webapp import CHROMIUM_ARGS, BrowserLog, WebApp, chromium, npm

ARTIFACTS = ROOT / ".artifacts" / "webapp"
# Measured on this 2-core machine: cold `npm ci` + build 18-29 s (idle to loaded), a rebuild for
# a new API URL (each run: the app's port is free-picked) 9-15 s, a cached build 0 s. The bound
# leaves room for a slow registry on a fresh CI machine.
BUILD_TIMEOUT = 600.0
# One stage of the walk: the web app polls every 2 s and a run takes about 5 s here.
STAGE_TIMEOUT_MS = 60_000

IDEA = (
    "A shared grocery list for households. "
    "Members add items from their phones and see who is buying what."
)
REVIEWS = ("architect", "critic", "optimist", "security_guardian", "user_advocate")
ADDED = "Each list has an owner who invites members; items sync when back online."
# What the model makes of the edited proposal and the notes (the fake's default is the parent's).
REVISED_PROPOSAL = {
    "title": "Shared grocery list",
    "summary": "A list a household edits together.",
    "problem_statement": "Households forget items.",
    "proposed_solution": f"A synced list with per-item owners.\n{ADDED}",
    "assumptions": ["Members have phones"],
    "scope_non_goals": ["Payments"],
}
DECISION_BADGE = re.compile(r"^(APPROVE|REVISE|REJECT)$")


@pytest.fixture
def artifacts() -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS


@pytest.fixture
def served(
    pg_url: str, llm: FakeOpenAI, store: RunStore, artifacts: Path
) -> Iterator[tuple[str, WebApp]]:
    """Chromium's path, and the web app served against the running service; both stopped after."""
    browser = chromium()
    npm()
    web_port = free_port()
    app = AppProcess(
        {
            "ENV": "testing",
            "DATABASE_URL": pg_url,
            "LLM_PROVIDER": "openai",
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": llm.url,
            "PUSH_AUTH": "none",
            # The embedded delivery: jobs run in-process, as with `make run`.
            "PUBSUB_PROJECT_ID": "",
            "RETRY_INITIAL_BACKOFF_SECONDS": "0.01",
            "LOG_LEVEL": "INFO",
            "CORS_ORIGINS": f"http://127.0.0.1:{web_port}",
        },
        artifacts / "app.log",
    )
    web = WebApp(app.url, artifacts / "webapp.log", port=web_port)
    try:
        app.start()
        web.start(BUILD_TIMEOUT)
        yield browser, web
    finally:
        web.stop()
        app.stop()


class Walk:
    """One page, its log, and a screenshot per stage (and of the page where a stage failed)."""

    def __init__(self, page: Page, log: BrowserLog) -> None:
        self.page = page
        self.log = log
        self.shots: list[Path] = []
        self.findings: list[str] = []

    def finding(self, what: str) -> None:
        """Something a person would see wrong that does not stop the walk; asserted at the end."""
        self.findings.append(what)

    async def shot(self, name: str, target: Locator | None = None, full_page: bool = True) -> None:
        path = ARTIFACTS / f"{name}.png"
        if target is None:
            await self.page.screenshot(path=path, full_page=full_page)
        else:
            await target.screenshot(path=path)
        self.shots.append(path)

    @asynccontextmanager
    async def stage(self, name: str) -> AsyncIterator[None]:
        try:
            yield
        except Exception as error:
            failed = ARTIFACTS / f"FAILED-{name}.png"
            try:
                await self.page.screenshot(path=failed, full_page=True)
            except Exception as shot_error:
                failed = Path(f"(no screenshot: {shot_error})")
            raise AssertionError(
                f"reference web app, stage {name!r} failed: {error}\n"
                f"screenshot: {failed}\nwhat the browser saw:\n{self.log.report()}"
            ) from error


async def _post_json(walk: Walk, button: Locator, path_part: str) -> dict[str, Any]:
    """Click `button` and return the JSON of the POST it sends to a URL containing `path_part`."""
    async with walk.page.expect_response(
        lambda r: path_part in r.url and r.request.method == "POST", timeout=STAGE_TIMEOUT_MS
    ) as info:
        await button.click()
    response = await info.value
    body: dict[str, Any] = await response.json()
    assert response.status == 202, f"POST {response.url} -> {response.status}: {body}"
    return body


async def _wait_for_decision(walk: Walk, label: str) -> None:
    """The final decision and its badge shown, and all seven steps read as completed."""
    page = walk.page
    await expect(page.get_by_role("heading", name="Final Decision")).to_be_visible(
        timeout=STAGE_TIMEOUT_MS
    )
    # The packet's badge: a role=status span whose text is the decision in capitals.
    badge = page.get_by_role("status").filter(has_text=DECISION_BADGE)
    await expect(badge).to_have_text(label.upper())
    # The timeline's badges once the run is complete (the web app knows pending, running,
    # completed and failed; anything else it shows as its raw name in a grey "pending" style).
    timeline = page.get_by_role("region", name="Pipeline progress")
    badges = await timeline.get_by_role("status").all_inner_texts()
    steps = await timeline.locator("li h3").all_inner_texts()
    shown = dict(zip(steps, badges, strict=True))
    if len(shown) != 7 or set(shown.values()) != {"Completed"}:
        walk.finding(
            f"a completed {label} run's timeline does not read as 7 completed steps: {shown}"
        )


async def test_submit_watch_revise_and_compare(served: tuple[str, WebApp], llm: FakeOpenAI) -> None:
    browser_path, web = served
    # A clear first verdict: 0.85 would approve, but the security guardian's critical blocking
    # issue vetoes it to revise; the critic dissents with a blocking issue of its own.
    llm.blocking["security_guardian"] = [
        {
            "text": "Shared lists expose who lives together; no access control.",
            "security_critical": True,
        }
    ]
    llm.blocking["critic"] = [
        {"text": "Two members editing offline lose each other's items.", "security_critical": False}
    ]
    # Slow enough that the timeline is seen moving (the web app polls every 2 s).
    llm.step_delay.update({"expand": 2.0, **{f"review_{p}": 1.0 for p in REVIEWS}})

    log = BrowserLog()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=browser_path, args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            page = await context.new_page()
            page.set_default_timeout(STAGE_TIMEOUT_MS)
            page.on("console", log.on_console)
            page.on("request", log.on_request)
            page.on("requestfailed", log.on_request_failed)
            page.on("response", log.on_response)
            walk = Walk(page, log)
            try:
                await _walk(walk, web, llm)
            finally:
                log.write(ARTIFACTS / "browser.log")
                await context.close()
        finally:
            await browser.close()

    assert log.off_loopback == [], f"the page reached beyond loopback: {log.off_loopback}"
    assert walk.findings == [], "\n".join(["what a person would see wrong:", *walk.findings])
    assert log.problems == [], f"the walk passed, but the browser saw:\n{log.report()}"


async def _walk(walk: Walk, web: WebApp, llm: FakeOpenAI) -> None:
    page = walk.page

    async with walk.stage("open"):
        await page.goto(f"{web.url}/")
        await expect(page.get_by_role("heading", name="Submit Your Idea")).to_be_visible()
        await walk.shot("01-open")

    async with walk.stage("submit"):
        await page.get_by_label("Your Idea").fill(IDEA)
        submit = page.get_by_role("button", name="Submit idea for review")
        accepted = await _post_json(walk, submit, "/v1/full-review")
        assert accepted["status"] == "queued", accepted
        await expect(page.get_by_role("heading", name="Review Progress")).to_be_visible()
        await expect(page.get_by_role("region", name="Pipeline progress")).to_be_visible()
        await walk.shot("02-progress")

    async with walk.stage("decision"):
        await _wait_for_decision(walk, "revise")
        await walk.shot("03-decision")

    async with walk.stage("minority report"):
        await expect(page.get_by_role("heading", name="Minority Report")).to_be_visible()
        concerns = page.locator("h5:text-is('Core Concerns') + p")
        await expect(concerns).to_have_count(2)  # the critic and the security guardian
        for text in await concerns.all_inner_texts():
            assert text.strip(), "a minority report's Core Concerns is empty"
        report = page.locator("div.border-amber-200").filter(
            has=page.get_by_role("heading", name="Minority Report")
        )
        await report.scroll_into_view_if_needed()
        await walk.shot("04-minority-report", report)

    async with walk.stage("details"):
        await page.get_by_role("button", name="View Detailed Proposal & Reviews").click()
        details = page.get_by_role("dialog", name="Detailed Proposal & Reviews")
        await expect(details).to_be_visible()
        await expect(details.get_by_text("Security Guardian").first).to_be_visible()
        await walk.shot("05-details-modal", full_page=False)
        await page.keyboard.press("Escape")
        await expect(details).to_be_hidden()

    async with walk.stage("revise"):
        await page.get_by_role("button", name="Revise & Re-run").click()
        dialog = page.get_by_role("dialog", name="Revise & Re-run Proposal")
        await expect(dialog).to_be_visible()
        proposal = dialog.locator("#editedProposal")
        await expect(proposal).not_to_have_value("")  # pre-filled from the parent's proposal
        edited = (await proposal.input_value()).replace(
            "## Assumptions", f"{ADDED}\n\n## Assumptions"
        )
        await proposal.fill(edited)
        await dialog.locator("#editNotes").fill(
            "Added access control per list and offline merge, from the two blocking issues."
        )
        await walk.shot("06-revision-modal", full_page=False)
        # The revision answers both blocking issues.
        llm.queue("expand", Reply(raw_text=json.dumps(REVISED_PROPOSAL)))
        llm.blocking.clear()
        llm.scores["security_guardian"] = 0.9
        create = dialog.get_by_role("button", name="Create Revision")
        accepted = await _post_json(walk, create, "/revisions")
        assert accepted["status"] == "queued", accepted
        await expect(dialog).to_be_hidden()

    async with walk.stage("revision decision"):
        await _wait_for_decision(walk, "approve")
        await expect(page.get_by_role("button", name="Compare with Parent")).to_be_visible()
        await walk.shot("07-revision-decision")

    async with walk.stage("compare"):
        async with page.expect_response(
            lambda r: "/diff/" in r.url and r.request.method == "GET"
        ) as info:
            await page.get_by_role("button", name="Compare with Parent").click()
        diff = await info.value
        assert diff.status == 200, f"GET {diff.url} -> {diff.status}: {await diff.text()}"
        await expect(page.get_by_role("heading", name="Comparison Metadata")).to_be_visible()
        await expect(page.get_by_role("heading", name="Decision Changes")).to_be_visible()
        await expect(page.get_by_text("Diff Not Available")).to_have_count(0)
        view = page.locator("div.space-y-6").filter(
            has=page.get_by_role("heading", name="Comparison Metadata")
        )
        await expect(view.last.get_by_role("heading", name="Persona Score Changes")).to_be_visible()
        await expect(view.last.locator("tbody tr")).to_have_count(5)
        solution = view.last.locator("div.border-l-4").filter(
            has=page.get_by_role("heading", name="proposed solution")
        )
        await expect(solution).to_contain_text("Status: modified")
        # The web app asks for diff(revision, parent); a parent and its revision always read
        # parent -> revision, so the person's addition is a "+" line and the decision moves
        # from the parent's to the revision's.
        await expect(solution.locator("pre")).to_contain_text(f"+{ADDED}")
        decisions = view.last.locator("span.capitalize")
        await expect(decisions).to_have_text(["revise", "approve"], ignore_case=True)
        await view.last.scroll_into_view_if_needed()
        await walk.shot("08-diff")
        await walk.shot("09-diff-detail", view.last)

    async with walk.stage("history"):
        # The panel lists this session's runs, the revision under its parent (it asks the API
        # for nothing: the web app's history hook is built with autoFetch off).
        await page.get_by_role("button", name="View All History").click()
        await expect(page.get_by_role("heading", name="Run History")).to_be_visible()
        await expect(page.get_by_text("Revisions (1)")).to_be_visible()
        await walk.shot("10-history", full_page=False)
