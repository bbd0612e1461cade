"""How long from a step's write committing in PostgreSQL to the run page in a browser showing it.

Two uvicorn processes on a scratch database: the viewer serves the run page (UI_ENABLED) and
the worker executes the run (a push, as Pub/Sub would send it), so every event crosses from
one process to the other through NOTIFY, as between Cloud Run instances. Debian's Chromium
(Playwright) opens the run page before the run starts; a MutationObserver notes when each step's
row first shows `running` and `completed`. The database's own time of each event (`run_events.
created_at`, clock_timestamp() inside the writing transaction) is the start; both clocks are this
machine's. The fake OpenAI server holds each call STEP_SECONDS, as a model would.

    .venv/bin/python -m benchmarks.live_latency [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
from playwright.async_api import async_playwright

from app.domain.personas import STEP_NAMES
from app.push.envelope import encode_wrapped
from benchmarks.harness import AppProcess, Database, say, scratch_database
from tests.fakes.openai_server import FakeOpenAI
from tests.webapp import CHROMIUM_ARGS, chromium

STEP_SECONDS = 0.5
SUBSCRIPTION = "projects/bench/subscriptions/live-latency"
IDEA = "A tool library for a street: neighbours lend drills and ladders through a shared shelf."
# Runs in the page: when each step's row first shows each status (ms since the epoch).
OBSERVER = """
window.__seen = {};
document.addEventListener('DOMContentLoaded', () => {
  const note = () => {
    for (const row of document.querySelectorAll('tr[data-step]')) {
      const key = row.dataset.step + '/' + row.dataset.status;
      if (!(key in window.__seen)) window.__seen[key] = Date.now();
    }
  };
  note();
  new MutationObserver(note).observe(document.body,
    {subtree: true, childList: true, attributes: true, attributeFilter: ['data-status']});
});
"""
SHOWN_AS = {"step_started": "running", "step_completed": "completed"}


async def one_run(
    database: Database, viewer: AppProcess, worker: AppProcess, page: Any
) -> list[float]:
    """Latencies (ms) of one run's step events, committed by `worker`, shown by `viewer`."""
    async with httpx2.AsyncClient(timeout=60) as client:
        answer = await client.post(f"{viewer.url}/v1/full-review", json={"idea": IDEA})
        run_id = answer.json()["run_id"]
        await page.goto(f"{viewer.url}/runs/{run_id}")
        await page.wait_for_timeout(500)  # the page's EventSource is connected and listening
        body = encode_wrapped({"run_id": run_id}, f"m-{run_id}", SUBSCRIPTION)
        assert (await client.post(f"{worker.url}/pubsub/push", content=body)).status_code == 204
    await page.wait_for_function(
        "document.querySelectorAll('tr[data-step][data-status=\"completed\"]').length === 7",
        timeout=30_000,
    )
    seen: dict[str, int] = await page.evaluate("window.__seen")
    connection = await asyncpg.connect(database.dsn)
    try:
        rows = await connection.fetch(
            "SELECT event, data->>'step_name' AS step, created_at FROM run_events"
            " WHERE run_id = $1 ORDER BY seq",
            run_id,
        )
    finally:
        await connection.close()
    latencies = []
    for row in rows:
        status = SHOWN_AS.get(row["event"])
        shown = seen.get(f"{row['step']}/{status}") if status else None
        if shown is not None:
            committed: datetime = row["created_at"]
            latencies.append(shown - committed.timestamp() * 1000)
    return latencies


async def measure(database: Database, runs: int) -> list[float]:
    llm = FakeOpenAI().start()
    for step in STEP_NAMES[:-1]:  # every step but the aggregation calls the model
        llm.step_delay[step] = STEP_SECONDS
    workdir = Path(tempfile.mkdtemp(prefix="live-latency-"))
    try:
        common = {
            "ENV": "testing",
            "DATABASE_URL": database.url,
            "LLM_PROVIDER": "openai",
            "OPENAI_API_KEY": "sk-bench",
            "OPENAI_BASE_URL": llm.url,
            "PUSH_AUTH": "none",
            # Published nowhere (a closed port): the push below is the one delivery.
            "PUBSUB_PROJECT_ID": "bench",
            "PUBSUB_EMULATOR_HOST": "127.0.0.1:9",
            "SWEEP_INTERVAL_SECONDS": "0",
            "LOG_LEVEL": "WARNING",
        }
        viewer = AppProcess({**common, "UI_ENABLED": "true"}, workdir / "viewer.log")
        worker = AppProcess(common, workdir / "worker.log")
        viewer.start()
        worker.start()
        try:
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(
                    executable_path=chromium(), args=CHROMIUM_ARGS
                )
                page = await browser.new_page()
                await page.add_init_script(OBSERVER)
                latencies: list[float] = []
                for index in range(runs):
                    found = await one_run(database, viewer, worker, page)
                    say(f"run {index + 1}: {len(found)} events, max {max(found):.1f} ms")
                    latencies.extend(found)
                await browser.close()
            return latencies
        finally:
            viewer.stop()
            worker.stop()
    finally:
        llm.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with scratch_database() as database:
        latencies = sorted(asyncio.run(measure(database, args.runs)))
    if not latencies:
        sys.exit("no event was seen in the browser")
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    print("| step write committed -> run page shows it (other process, NOTIFY) | ms |")
    print("|---|---|")
    print(f"| events | {len(latencies)} |")
    print(f"| median | {statistics.median(latencies):.1f} |")
    print(f"| p95 | {p95:.1f} |")
    print(f"| max | {latencies[-1]:.1f} |")
    print(f"| min | {latencies[0]:.1f} |")


if __name__ == "__main__":
    main()
