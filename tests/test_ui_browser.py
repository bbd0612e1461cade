"""The run viewer in headless Chromium (Debian's, through Playwright), against the real service.

uvicorn on PostgreSQL with the fake OpenAI server slowed down, runs delivered in-process as with
`make run`. As a person would: submit an idea, watch the timeline go from running to completed
without a reload (the page follows the run's Server-Sent Events), read a review and the decision,
follow the header link to the runs list; the same at phone width with no sideways scroll; a
model output holding markup is shown as text and runs nothing. No console error, no CSP
violation, no request beyond loopback. Screenshots go to .artifacts/ui/.

Skips loudly where Chromium is missing, fails instead under CI=true.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import Error, Page, Request, async_playwright, expect

from app.domain.personas import STEP_NAMES
from app.store.runs import RunStore
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.procs import ROOT, AppProcess
from tests.webapp import CHROMIUM_ARGS, BrowserLog, chromium

ARTIFACTS = ROOT / ".artifacts" / "ui"
TIMEOUT_MS = 20_000
IDEA = (
    "A shared grocery list for households. "
    "Members add items from their phones and see who is buying what."
)
# Slow enough to see each step running: the expansion, then the five reviews together.
STEP_DELAYS = {"expand": 1.0, **{step: 0.6 for step in STEP_NAMES if step.startswith("review_")}}
# What the walks' runs are told: a security-critical issue (the guardian's veto turns approve into
# revise) and a critic's blocking issue (a minority report), so the pages show every part.
BLOCKING = {
    "security_guardian": [
        {"text": "Shared lists expose who lives together.", "security_critical": True}
    ],
    "critic": [{"text": "Offline edits can overwrite each other.", "security_critical": False}],
}
XSS = "<script>window.__xss=1</script>"
XSS_IMG = '<img src=x onerror="window.__xss=2">'
# Before any page script: collect CSP violations. (How fast a step reaches the page is measured
# by benchmarks/live_latency.py, not here.)
WATCH = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__csp.push(e.violatedDirective + ' ' + e.blockedURI);
});
"""


@pytest.fixture(scope="module")
def viewer(pg_url: str, fake_openai: FakeOpenAI) -> Iterator[tuple[str, AppProcess]]:
    """Chromium's path and the service with the run viewer on; stopped after the module."""
    browser = chromium()
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    app = AppProcess(
        {
            "ENV": "testing",
            "DATABASE_URL": pg_url,
            "LLM_PROVIDER": "openai",
            "OPENAI_API_KEY": "sk-test",
            "OPENAI_BASE_URL": fake_openai.url,
            "PUSH_AUTH": "none",
            "UI_ENABLED": "true",
            # The embedded delivery: jobs run in-process, as with `make run`.
            "PUBSUB_PROJECT_ID": "",
            "RETRY_INITIAL_BACKOFF_SECONDS": "0.01",
            "LOG_LEVEL": "INFO",
        },
        ARTIFACTS / "app.log",
    )
    try:
        app.start()
        yield browser, app
    finally:
        app.stop()


@dataclass
class Visit:
    """One browser page and everything it reported."""

    page: Page
    log: BrowserLog
    page_errors: list[str] = field(default_factory=list)
    navigations: list[str] = field(default_factory=list)

    async def shot(self, name: str) -> Path:
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=path, full_page=True)
        return path

    async def assert_clean(self) -> None:
        """No console error, uncaught exception, CSP violation or request off loopback."""
        csp = await self.page.evaluate("window.__csp")
        assert csp == [], f"CSP violations: {csp}"
        assert self.page_errors == [], f"page errors: {self.page_errors}"
        assert self.log.problems == [], self.log.report()
        assert self.log.off_loopback == [], f"requests off loopback: {self.log.off_loopback}"


@asynccontextmanager
async def visit(browser_path: str, width: int, height: int, name: str) -> AsyncIterator[Visit]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=browser_path, args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(viewport={"width": width, "height": height})
            await context.add_init_script(WATCH)
            page = await context.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            seen = Visit(page, BrowserLog())
            page.on("console", seen.log.on_console)
            page.on("request", seen.log.on_request)
            page.on("requestfailed", _ignore_closed_streams(seen.log))
            page.on("response", seen.log.on_response)
            page.on("pageerror", lambda error: seen.page_errors.append(str(error)))
            page.on(
                "framenavigated",
                lambda frame: (
                    seen.navigations.append(frame.url) if frame == page.main_frame else None
                ),
            )
            try:
                yield seen
            except Exception:
                # The page may be gone; the assertion says what went wrong either way.
                with contextlib.suppress(Error):
                    await page.screenshot(path=ARTIFACTS / f"FAILED-{name}.png", full_page=True)
                raise
            finally:
                seen.log.write(ARTIFACTS / f"{name}-browser.log")
        finally:
            await browser.close()


def _ignore_closed_streams(log: BrowserLog) -> Any:
    """Failed requests are problems, except the event stream the page closed itself."""

    def on_failed(request: Request) -> None:
        closed = urlsplit(request.url).path.endswith("/events")
        if closed and request.failure == "net::ERR_ABORTED":
            return
        log.on_request_failed(request)

    return on_failed


async def submit_and_watch(seen: Visit, app_url: str, idea: str) -> str:
    """Submit `idea` from the form; watch its run page reach completed without a reload."""
    page = seen.page
    await page.goto(f"{app_url}/")
    await page.get_by_label("Idea").fill(idea)
    await page.get_by_role("button", name="Submit for review").click()
    await page.wait_for_url("**/runs/*")
    run_id = page.url.rsplit("/", 1)[1]
    await page.evaluate("window.__noReload = 1")
    navigations = len(seen.navigations)

    timeline = page.locator("table.timeline")
    # Running, then completed: seen live, step by step.
    await expect(timeline.locator('tr[data-step="expand"] .badge')).to_have_text("Running")
    await expect(timeline.locator('tr[data-step="review_critic"] .badge')).to_have_text("Running")
    await expect(timeline.locator('tr[data-step="expand"] .badge')).to_have_text("Completed")
    await expect(page.locator('[data-role="run-status"] .badge')).to_have_text("Completed")
    await expect(timeline.locator("tr[data-step] .badge")).to_have_text(["Completed"] * 7)
    assert await page.evaluate("window.__noReload") == 1
    assert seen.navigations[navigations:] == [], "the run page reloaded"
    await expect(page.locator("#live-status")).to_contain_text("Run completed")
    return run_id


async def read_result(seen: Visit) -> None:
    """A review and the decision, as text on the page."""
    page = seen.page
    architect = page.locator("article.review", has=page.get_by_role("heading", name="Architect"))
    await expect(architect).to_contain_text("architect recommends a pilot")
    await expect(architect).to_be_visible()
    guardian = page.locator(
        "article.review", has=page.get_by_role("heading", name="Security Guardian")
    )
    await expect(guardian).to_contain_text("Security-critical Shared lists expose")
    decision = page.locator("section", has=page.get_by_role("heading", name="Decision", exact=True))
    await expect(decision.locator("p.decision")).to_contain_text(
        "Revise overall weighted confidence 0.85; the Security Guardian's veto"
    )
    await expect(decision.locator("article.minority h4")).to_contain_text(
        ["Critic", "Security Guardian"]
    )
    chart = page.get_by_role("img", name="Weighted contribution of each persona")
    await expect(chart).to_be_visible()


async def follow_to_runs_list(seen: Visit, run_id: str) -> None:
    page = seen.page
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Runs").click()
    await page.wait_for_url("**/runs")
    await expect(page.locator(f'a[href="/runs/{run_id}"]')).to_be_visible()


@pytest.fixture
def fresh(viewer: tuple[str, AppProcess], llm: FakeOpenAI, store: RunStore) -> tuple[str, str]:
    """The browser's path and the app's URL, the fake OpenAI slowed, the tables empty."""
    llm.step_delay.update(STEP_DELAYS)
    llm.blocking.update(BLOCKING)
    browser_path, app = viewer
    return browser_path, app.url


async def test_wide_submit_watch_live_read_and_list(fresh: tuple[str, str]) -> None:
    browser_path, app_url = fresh
    async with visit(browser_path, 1440, 900, "wide") as seen:
        run_id = await submit_and_watch(seen, app_url, IDEA)
        await read_result(seen)
        shot = await seen.shot("run-1440")
        assert shot.stat().st_size > 0
        await follow_to_runs_list(seen, run_id)
        await seen.shot("runs-1440")
        await seen.assert_clean()


async def test_phone_width_has_no_sideways_scroll(fresh: tuple[str, str]) -> None:
    browser_path, app_url = fresh
    async with visit(browser_path, 375, 812, "narrow") as seen:
        page = seen.page
        run_id = await submit_and_watch(seen, app_url, IDEA)
        await read_result(seen)
        assert await page.evaluate("document.documentElement.scrollWidth") <= 375
        await seen.shot("run-375")
        # What a phone shows of it: the timeline, then the decision and its chart.
        await page.screenshot(
            path=ARTIFACTS / "run-375-top.png",
            clip={"x": 0, "y": 0, "width": 375, "height": 2400},
            full_page=True,
        )
        await follow_to_runs_list(seen, run_id)
        assert await page.evaluate("document.documentElement.scrollWidth") <= 375
        await seen.shot("runs-375")
        await page.goto(f"{app_url}/")
        assert await page.evaluate("document.documentElement.scrollWidth") <= 375
        await seen.assert_clean()


async def test_markup_in_model_output_is_shown_as_text(
    fresh: tuple[str, str], llm: FakeOpenAI
) -> None:
    browser_path, app_url = fresh
    proposal = {
        "title": f"Groceries {XSS}",
        "summary": f"Summary {XSS_IMG}",
        "problem_statement": "Households forget items.",
        "proposed_solution": XSS,
        "assumptions": [XSS_IMG],
        "scope_non_goals": [],
    }
    llm.queue("expand", Reply(raw_text=json.dumps(proposal)))
    llm.blocking["security_guardian"] = [{"text": XSS_IMG, "security_critical": True}]
    async with visit(browser_path, 1440, 900, "xss") as seen:
        page = seen.page
        await submit_and_watch(seen, app_url, "An idea whose expansion carries markup.")
        await expect(page.get_by_role("heading", level=1)).to_have_text(f"Groceries {XSS}")
        guardian = page.locator(
            "article.review", has=page.get_by_role("heading", name="Security Guardian")
        )
        await expect(guardian).to_contain_text(f"Security-critical {XSS_IMG}")
        assert await page.evaluate("typeof window.__xss") == "undefined"
        assert await page.locator("img").count() == 0
        assert await page.locator("main script").count() == 0
        await seen.shot("xss")
        await seen.assert_clean()


async def test_revise_then_compare_with_the_parent(fresh: tuple[str, str], llm: FakeOpenAI) -> None:
    browser_path, app_url = fresh
    async with visit(browser_path, 1440, 900, "revise") as seen:
        page = seen.page
        parent = await submit_and_watch(seen, app_url, IDEA)
        await page.get_by_role("link", name="Revise and re-run").click()
        await page.wait_for_url(f"**/runs/{parent}/revise")
        await expect(page.get_by_label("Title")).to_have_value("Shared grocery list")
        await page.get_by_label("Title").fill("Shared grocery list by aisle")
        llm.blocking.clear()  # the re-run reviewers are satisfied this time
        await page.get_by_role("button", name="Queue the revision").click()
        await page.wait_for_url("**/runs/*")
        await expect(page.locator('[data-role="run-status"] .badge')).to_have_text("Completed")
        await expect(page.get_by_role("heading", level=1)).to_have_text(
            "Shared grocery list by aisle"
        )
        await expect(page.locator("tr[data-step] .tag").first).to_contain_text("reused from")
        await page.get_by_role("link", name="Compare with parent").click()
        await page.wait_for_url("**/compare?*")
        await expect(page.locator("del.diff-del")).to_have_text("-Shared grocery list")
        await expect(page.locator("ins.diff-add")).to_have_text("+Shared grocery list by aisle")
        await seen.shot("compare-1440")
        await seen.assert_clean()


async def test_keyboard_reaches_the_content_first(fresh: tuple[str, str]) -> None:
    browser_path, app_url = fresh
    async with visit(browser_path, 375, 812, "keyboard") as seen:
        page = seen.page
        await page.goto(f"{app_url}/runs")
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
        await page.keyboard.press("Enter")
        assert await page.evaluate("document.activeElement.id") == "main"
        await page.keyboard.press("Tab")  # the first control of the page: the status filter
        assert await page.evaluate("document.activeElement.id") == "status"
        await seen.assert_clean()
