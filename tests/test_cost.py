"""Cost: prices turn every call's tokens into money per step and per run; the daily budget
defers runs not yet started, lets started runs finish, and the sweep wakes them the next day."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from loguru import logger
from sqlalchemy import update

import app.cost
from app.cost import CostMeter, DailyBudget, budget_day
from app.domain.models import TokenUsage
from app.domain.personas import AGGREGATE_STEP, EXPAND_STEP, STEP_NAMES
from app.domain.pricing import DEFAULT_PRICES, ModelPrice, add_costs, cost_usd, is_spent
from app.push.policy import Outcome, status_for
from app.settings import Settings
from app.store.tables import Run, StepProgress
from tests.conftest import running_app, services_of
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.test_api import AppClient, wait_for_status
from tests.test_push_pipeline import new_run, push, run_json
from tests.test_revisions import completed_parent, revise

TABLE = {"m": ModelPrice(input_per_1m_usd=2.0, output_per_1m_usd=8.0)}
# The fake LLM's usage of every call: 100 input and 50 output tokens.
FAKE_CALL = TokenUsage(100, 50, 150)
GPT51_CALL = (100 * 1.25 + 50 * 10.0) / 1_000_000  # 0.000625 at the default price


@contextmanager
def log_lines() -> Iterator[list[dict[str, Any]]]:
    """The level, message and extra fields of every line logged inside the block."""
    lines: list[dict[str, Any]] = []

    def sink(message: Any) -> None:
        record = message.record
        lines.append({"level": record["level"].name, **record["extra"]})

    handle = logger.add(sink, level="DEBUG")
    try:
        yield lines
    finally:
        logger.remove(handle)


def events(lines: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("lifecycle_event") == event]


# --- pricing, pure -------------------------------------------------------------------------


def test_a_call_costs_its_tokens_at_the_models_price() -> None:
    assert cost_usd(TABLE, "m", TokenUsage(1_000_000, 0, 1_000_000)) == 2.0
    assert cost_usd(TABLE, "m", TokenUsage(500_000, 250_000, 750_000)) == 1.0 + 2.0
    assert cost_usd(DEFAULT_PRICES, "gpt-5.1", FAKE_CALL) == GPT51_CALL


def test_a_dated_snapshot_is_priced_as_its_model() -> None:
    assert cost_usd(TABLE, "m-2025-11-13", FAKE_CALL) == cost_usd(TABLE, "m", FAKE_CALL)
    assert cost_usd(DEFAULT_PRICES, "gpt-5.1-2025-11-13", FAKE_CALL) == GPT51_CALL
    assert cost_usd(TABLE, "m-latest", FAKE_CALL) is None


def test_an_unknown_model_costs_unknown_but_no_tokens_cost_nothing() -> None:
    assert cost_usd(TABLE, "other", FAKE_CALL) is None
    assert cost_usd(TABLE, None, FAKE_CALL) is None
    assert cost_usd(TABLE, "other", TokenUsage()) == 0.0
    assert cost_usd(TABLE, None, TokenUsage()) == 0.0


def test_costs_add_up_until_one_is_unknown() -> None:
    assert add_costs([0.1, 0.2, 0.0]) == 0.3  # rounded: not 0.30000000000000004
    assert add_costs([]) == 0.0
    assert add_costs([0.1, None, 0.2]) is None


def test_a_budget_is_spent_once_reached() -> None:
    assert not is_spent(0.99, 1.0)
    assert is_spent(1.0, 1.0)
    assert is_spent(0.1 + 0.2 + 0.7, 1.0)
    assert is_spent(2.0, 1.0)


def test_a_deferred_delivery_is_acknowledged() -> None:
    assert status_for(Outcome.DEFERRED) == 204


def test_an_unknown_model_is_said_once() -> None:
    meter = CostMeter(TABLE)
    with log_lines() as lines:
        assert meter.cost("other", FAKE_CALL) is None
        assert meter.cost("other", FAKE_CALL) is None
        assert meter.cost("m", FAKE_CALL) is not None
        assert meter.cost("third", FAKE_CALL) is None
    said = events(lines, "price_unknown")
    assert [line["model"] for line in said] == ["other", "third"]
    assert all(line["level"] == "WARNING" for line in said)


# --- cost per step and per run, through the API --------------------------------------------


def steps_of(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {step["step_name"]: step for step in run["step_progress"]}


async def listed_cost(client: Any, run_id: str) -> Any:
    listed = (await client.get("/v1/runs", params={"limit": 100})).json()["runs"]
    [item] = [item for item in listed if item["run_id"] == run_id]
    return item["cost_usd"]


async def test_steps_and_runs_show_the_cost_of_their_calls(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    # LLM_PRICES overrides the default price of gpt-5.1.
    prices = '{"gpt-5.1": {"input_per_1m_usd": 2, "output_per_1m_usd": 20}}'
    call = (100 * 2 + 50 * 20) / 1_000_000
    async with running_app(make_settings(llm_prices=prices)) as (app, client):
        run_id = await new_run(app)
        # The critic's first answer is garbage: its step pays for two calls.
        llm.queue("review_critic", Reply(raw_text="not json"))
        assert (await push(client, {"run_id": run_id})).status_code == 204
        run = await run_json(client, run_id)
        steps = steps_of(run)
        assert steps["review_critic"]["attempts"] == 2
        assert steps["review_critic"]["cost_usd"] == pytest.approx(2 * call)
        for name in STEP_NAMES:
            if name in (AGGREGATE_STEP, "review_critic"):
                continue
            assert steps[name]["model"] == "gpt-5.1"
            assert steps[name]["cost_usd"] == pytest.approx(call)
        assert steps[AGGREGATE_STEP]["model"] is None
        assert steps[AGGREGATE_STEP]["cost_usd"] == 0.0
        assert run["cost_usd"] == pytest.approx(7 * call)
        assert run["usage"]["total_tokens"] == 7 * 150
        assert await listed_cost(client, run_id) == pytest.approx(7 * call)
        # A queued run has spent nothing yet.
        queued = await new_run(app)
        assert (await run_json(client, queued))["cost_usd"] == 0.0


async def test_an_unknown_model_costs_null_and_is_said_once(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    async with running_app(make_settings(openai_model="house-model-7")) as (app, client):
        with log_lines() as lines:
            first, second = await new_run(app), await new_run(app)
            assert (await push(client, {"run_id": first})).status_code == 204
            assert (await push(client, {"run_id": second})).status_code == 204
        run = await run_json(client, first)
        assert run["status"] == "completed"
        steps = steps_of(run)
        assert steps[EXPAND_STEP]["model"] == "house-model-7"
        assert steps[EXPAND_STEP]["cost_usd"] is None
        assert steps[AGGREGATE_STEP]["cost_usd"] == 0.0
        assert run["cost_usd"] is None
        assert await listed_cost(client, first) is None
    [said] = events(lines, "price_unknown")
    assert said["model"] == "house-model-7"
    completed = events(lines, "job_completed")
    assert [line["cost_usd"] for line in completed] == [None, None]


async def test_reused_reviews_cost_the_revision_nothing(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    _, client = app_client
    parent = await completed_parent(client, llm)
    assert parent["cost_usd"] == pytest.approx(6 * GPT51_CALL)
    # New fields need no call; critic and user advocate are re-run, the others reused.
    accepted = await revise(client, parent["run_id"], edited_proposal={"title": "Lists v2"})
    revision = await wait_for_status(client, accepted["run_id"], "completed")
    steps = steps_of(revision)
    reused = [name for name, step in steps.items() if step["reused_from_run_id"]]
    assert sorted(reused) == ["review_architect", "review_optimist", "review_security_guardian"]
    for name in (*reused, EXPAND_STEP, AGGREGATE_STEP):
        assert steps[name]["cost_usd"] == 0.0, name
    for name in ("review_critic", "review_user_advocate"):
        assert steps[name]["cost_usd"] == pytest.approx(GPT51_CALL)
    assert revision["cost_usd"] == pytest.approx(2 * GPT51_CALL)


# --- the daily budget ----------------------------------------------------------------------


class FakeSpend:
    """The spend query, in memory: what was spent by day."""

    def __init__(self) -> None:
        self.by_day: dict[datetime, float] = {}
        self.queries = 0

    async def spent_between(self, start: datetime, end: datetime) -> float:
        self.queries += 1
        assert end - start == timedelta(days=1)
        await asyncio.sleep(0.01)  # a round trip: other deliveries ask meanwhile
        return self.by_day.get(start, 0.0)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


DAY = datetime(2026, 11, 30, tzinfo=UTC)


def test_the_budget_window_is_the_utc_day() -> None:
    assert budget_day(DAY + timedelta(hours=23, minutes=59)) == (DAY, DAY + timedelta(days=1))
    assert budget_day(DAY + timedelta(days=1))[0] == DAY + timedelta(days=1)
    # An instant with another offset is placed in its UTC day.
    evening_in_new_york = datetime(2026, 11, 30, 20, 0, tzinfo=UTC).astimezone(
        __import__("zoneinfo").ZoneInfo("America/New_York")
    )
    assert budget_day(evening_in_new_york)[0] == DAY


async def test_the_budget_is_spent_until_its_day_ends_and_said_once_a_day() -> None:
    spend, clock = FakeSpend(), Clock(DAY + timedelta(hours=9))
    budget = DailyBudget(spend, 10.0, clock=clock, check_seconds=0)
    with log_lines() as lines:
        assert await budget.exhausted_until() is None
        spend.by_day[DAY] = 10.0
        assert await budget.exhausted_until() == DAY + timedelta(days=1)
        clock.now += timedelta(hours=14, minutes=59)
        assert await budget.exhausted_until() == DAY + timedelta(days=1)
        # The next day has its own budget.
        clock.now = DAY + timedelta(days=1)
        assert await budget.exhausted_until() is None
        spend.by_day[DAY + timedelta(days=1)] = 12.5
        assert await budget.exhausted_until() == DAY + timedelta(days=2)
    said = events(lines, "budget_exhausted")
    assert [line["deferred_until"] for line in said] == [
        (DAY + timedelta(days=1)).isoformat(),
        (DAY + timedelta(days=2)).isoformat(),
    ]
    assert all(line["level"] == "ERROR" for line in said)
    assert [line["spent_usd"] for line in said] == [10.0, 12.5]


async def test_one_reading_of_the_spend_serves_a_while() -> None:
    spend, clock = FakeSpend(), Clock(DAY + timedelta(hours=9))
    budget = DailyBudget(spend, 10.0, clock=clock, check_seconds=10)
    await asyncio.gather(*(budget.exhausted_until() for _ in range(20)))
    assert spend.queries == 1
    clock.now += timedelta(seconds=9)
    spend.by_day[DAY] = 11.0
    assert await budget.exhausted_until() is None
    clock.now += timedelta(seconds=1)
    assert await budget.exhausted_until() == DAY + timedelta(days=1)
    assert spend.queries == 2
    # A new day is read at once, however recent the last reading.
    clock.now = DAY + timedelta(days=1)
    assert await budget.exhausted_until() is None
    assert spend.queries == 3


@pytest.fixture
def fresh_spend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The app's budget reads the spend on every delivery (no reading reused)."""
    monkeypatch.setattr(app.cost, "SPEND_CHECK_SECONDS", 0.0)


async def set_run(app: FastAPI, run_id: str, **values: Any) -> None:
    async with services_of(app).engine.begin() as connection:
        await connection.execute(update(Run).where(Run.id == run_id).values(**values))


async def move_spend(app: FastAPI, by: timedelta) -> None:
    """Move every recorded cost back in time: to yesterday, the budget's day starts afresh."""
    async with services_of(app).engine.begin() as connection:
        await connection.execute(
            update(StepProgress)
            .where(StepProgress.spent_at.is_not(None))
            .values(spent_at=datetime.now(UTC) - by)
        )


async def untouched(app: FastAPI, client: Any, run_id: str, llm: FakeOpenAI) -> dict[str, Any]:
    """The run as a client sees it, asserted queued and never worked on."""
    run = await run_json(client, run_id)
    assert run["status"] == "queued"
    assert run["started_at"] is None and run["delivery_count"] == 0
    assert all(s["status"] == "pending" and s["attempts"] == 0 for s in run["step_progress"])
    assert run["cost_usd"] == 0.0
    assert not [c for c in llm.calls() if c.client_request_id.startswith(run_id + "/")]
    return run


async def test_spent_budget_defers_new_runs_while_started_runs_finish(
    make_settings: Callable[..., Settings], llm: FakeOpenAI, fresh_spend: None
) -> None:
    # One run's six calls (0.00375 USD) spend the whole budget.
    settings = make_settings(daily_budget_usd=0.001, max_retries_per_persona=0)
    async with running_app(settings) as (app, client):
        # A run an earlier delivery started: the provider failed, its lease was released.
        started = await new_run(app)
        llm.outage(500)
        assert (await push(client, {"run_id": started})).status_code == 503
        llm.outage(None)
        assert (await run_json(client, started))["status"] == "running"

        # A run in flight when the budget runs out finishes (it spends it itself).
        in_flight = await new_run(app)
        assert (await push(client, {"run_id": in_flight})).status_code == 204
        assert (await run_json(client, in_flight))["status"] == "completed"

        fresh = await new_run(app)
        with log_lines() as lines:
            for _ in range(2):
                assert (await push(client, {"run_id": fresh})).status_code == 204
            run = await untouched(app, client, fresh, llm)
            tomorrow = budget_day(datetime.now(UTC))[1]
            assert datetime.fromisoformat(run["deferred_until"]) == tomorrow
            # The started run is not held back: it finishes.
            assert (await push(client, {"run_id": started})).status_code == 204
            assert (await run_json(client, started))["status"] == "completed"
        [exhausted] = events(lines, "budget_exhausted")
        assert exhausted["level"] == "ERROR"
        assert exhausted["daily_budget_usd"] == 0.001
        assert exhausted["spent_usd"] == pytest.approx(6 * GPT51_CALL)
        assert len(events(lines, "job_deferred")) == 2

        # The budget's next day (the spend moved to yesterday): the run runs.
        await move_spend(app, timedelta(days=1))
        assert (await push(client, {"run_id": fresh})).status_code == 204
        assert (await run_json(client, fresh))["status"] == "completed"


async def test_the_sweep_wakes_deferred_runs_only_when_their_day_has_begun(
    make_settings: Callable[..., Settings], llm: FakeOpenAI, fresh_spend: None
) -> None:
    settings = make_settings(
        daily_budget_usd=0.001, run_stale_seconds=1, worker_job_timeout_seconds=60
    )
    async with running_app(settings) as (app, client):
        # The day's spend, recorded by another instance.
        spender = await new_run(app)
        assert (await push(client, {"run_id": spender})).status_code == 204

        # Submitted through the API: published (in-process here) and deferred on delivery.
        response = await client.post("/v1/full-review", json={"idea": "A tool library."})
        run_id = response.json()["run_id"]
        for _ in range(200):
            if (await run_json(client, run_id))["deferred_until"] is not None:
                break
            await asyncio.sleep(0.05)
        await untouched(app, client, run_id, llm)

        # Hours later, still the same day: the run is stale and past its job timeout
        # counted from when it was queued, yet neither re-enqueued nor failed.
        hours_ago = datetime.now(UTC) - timedelta(hours=2)
        await set_run(app, run_id, queued_at=hours_ago, updated_at=hours_ago)
        sweeper = services_of(app).sweeper
        report = await sweeper.sweep_once()
        assert (report.timed_out, report.requeued) == (0, 0)
        await untouched(app, client, run_id, llm)

        # The budget's day has ended: the sweep hands the run to the queue, and it runs.
        await set_run(app, run_id, deferred_until=datetime.now(UTC) - timedelta(seconds=1))
        await move_spend(app, timedelta(days=1))
        report = await sweeper.sweep_once()
        assert (report.timed_out, report.requeued) == (0, 1)
        await wait_for_status(client, run_id, "completed")
