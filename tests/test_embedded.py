"""The embedded default: SQLite made on first start, the offline provider, in-process delivery."""

from __future__ import annotations

from pathlib import Path

from app.settings import Settings
from tests.conftest import running_app, services_of
from tests.test_api import wait_for_status


async def test_full_review_completes_with_nothing_else_running(tmp_path: Path) -> None:
    database = tmp_path / "embedded.db"
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{database}",
        retry_initial_backoff_seconds=0.01,
        log_level="WARNING",
    )
    assert settings.effective_llm_provider == "offline"
    assert settings.auto_migrate

    async with running_app(settings, clean=False) as (_, client):
        assert (await client.get("/ready")).status_code == 200
        response = await client.post(
            "/v1/full-review", json={"idea": "A shared grocery list app for households."}
        )
        assert response.status_code == 202
        run = await wait_for_status(client, response.json()["run_id"], "completed")

    assert database.exists()
    assert run["decision_label"] in {"approve", "revise", "reject"}
    assert len(run["step_progress"]) == 7
    assert all(step["status"] == "completed" for step in run["step_progress"])
    assert run["proposal"]["title"].startswith("[offline]")
    assert len(run["persona_reviews"]) == 5
    assert run["usage"]["total_tokens"] > 0


async def test_offline_runs_are_deterministic(tmp_path: Path) -> None:
    decisions = []
    for name in ("a", "b"):
        settings = Settings(
            _env_file=None, database_url=f"sqlite+aiosqlite:///{tmp_path}/{name}.db"
        )
        async with running_app(settings, clean=False) as (_, client):
            response = await client.post("/v1/full-review", json={"idea": "A bike library."})
            run = await wait_for_status(client, response.json()["run_id"], "completed")
            decisions.append(
                (run["decision"], [r["confidence_score"] for r in run["persona_reviews"]])
            )
    assert decisions[0] == decisions[1]


async def test_runs_left_unfinished_are_picked_up_at_start(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{tmp_path}/restart.db",
        log_level="WARNING",
    )
    async with running_app(settings, clean=False) as (app, _):
        # Written but never delivered, as when a process stops right after the commit.
        run = await services_of(app).store.create_run("A repair café finder.", None)
        await services_of(app).store.claim(run.id, "dead-process/1", 0.01, None)

    async with running_app(settings, clean=False) as (_, client):
        result = await wait_for_status(client, run.id, "completed")
    assert result["delivery_count"] == 2
