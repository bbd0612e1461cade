"""The LLM's failure paths: a misconfigured provider, a bad request, queueing, the retry policy.

End to end through the push endpoint, PostgreSQL and the real openai SDK against the fake server.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest
from loguru import logger

from app.domain.personas import STEP_NAMES
from app.domain.retry import RetryPolicy
from app.llm import openai_provider
from app.llm.openai_provider import LogThrottle, retry_after_seconds
from app.settings import Settings
from tests.conftest import running_app
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.test_push_pipeline import AppClient, new_run, push, run_json

if TYPE_CHECKING:
    from loguru import Message

KEY = "sk-proj-secret-key-4711"
# What OpenAI answers for each, the 401's message quoting part of the key as the real one does.
MISCONFIGURED = {
    401: {
        "message": f"Incorrect API key provided: {KEY}. You can find your API key at ...",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    },
    403: {
        "message": "Country, region, or territory not supported",
        "type": "request_forbidden",
        "param": None,
        "code": "unsupported_country_region_territory",
    },
    404: {
        "message": "The model `gpt-x` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    },
}


@contextmanager
def error_logs() -> Iterator[list[dict[str, Any]]]:
    """Message and extra fields of every ERROR record logged inside the block.

    Entered once the app runs: its start-up replaces loguru's sinks.
    """
    lines: list[dict[str, Any]] = []

    def sink(message: Message) -> None:
        lines.append({"message": message.record["message"], **message.record["extra"]})

    handler = logger.add(sink, level="ERROR")
    try:
        yield lines
    finally:
        logger.remove(handler)


def misconfigured_lines(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("lifecycle_event") == "provider_misconfigured"]


def fresh_log_throttle(monkeypatch: pytest.MonkeyPatch, interval: float) -> None:
    """The throttle is process-wide; earlier tests must not have used up this test's line."""
    monkeypatch.setattr(openai_provider, "_misconfigured_log", LogThrottle(interval))


@pytest.mark.parametrize("status", sorted(MISCONFIGURED))
async def test_misconfigured_provider_keeps_runs_waiting_until_fixed(
    make_settings: Callable[..., Settings],
    llm: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
) -> None:
    fresh_log_throttle(monkeypatch, openai_provider.MISCONFIGURED_LOG_INTERVAL_SECONDS)
    body = {"error": MISCONFIGURED[status]}
    settings = make_settings(openai_api_key=KEY, max_delivery_attempts=20)
    async with running_app(settings) as (app, client):
        with error_logs() as lines:
            run_id = await new_run(app)
            # The provider starts refusing while the reviews are under way.
            llm.queue("review_architect", Reply(status, body=body))
            llm.queue("review_critic", Reply(status, body=body))

            first = await push(client, {"run_id": run_id})

            assert first.status_code == 503
            run = await run_json(client, run_id)
            assert run["status"] == "running"
            assert run["lease_owner"] is None
            steps = {s["step_name"]: s for s in run["step_progress"]}
            for step in ("expand", "review_optimist", "review_security_guardian"):
                assert steps[step]["status"] == "completed"
            for step in ("review_architect", "review_critic"):
                assert steps[step]["status"] == "failed"
                assert steps[step]["attempts"] == 1  # not retried
                assert f"HTTP {status}" in steps[step]["error_message"]
                assert MISCONFIGURED[status]["code"] in steps[step]["error_message"]
            assert f"HTTP {status}" in run["error_message"]

            # The outage goes on over more deliveries: each calls only the two missing steps,
            # once, and answers 503; one ERROR line says why, not one per call or delivery.
            llm.outage(status, body=body)
            for _ in range(2):
                assert (await push(client, {"run_id": run_id})).status_code == 503
            assert len(llm.calls("review_architect")) == 3
            assert len(llm.calls("review_critic")) == 3
            assert len(llm.calls()) == 6 + 2 * 2
            [line] = misconfigured_lines(lines)
            assert line["status"] == status
            assert line["model"] == llm.calls("review_critic")[0].body["model"]
            assert KEY not in json.dumps(lines, default=str)
            assert KEY not in json.dumps(await run_json(client, run_id))

            llm.outage(None)
            before = len(llm.calls())
            assert (await push(client, {"run_id": run_id})).status_code == 204

        run = await run_json(client, run_id)
    assert run["status"] == "completed"
    assert sorted(c.step for c in llm.calls()[before:]) == ["review_architect", "review_critic"]


async def test_misconfigured_provider_is_logged_once_per_interval(
    make_settings: Callable[..., Settings], llm: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    interval = 1.0
    fresh_log_throttle(monkeypatch, interval)
    llm.outage(401, body={"error": MISCONFIGURED[401]})
    async with running_app(make_settings(max_delivery_attempts=20)) as (app, client):
        with error_logs() as lines:
            run_ids = [await new_run(app) for _ in range(2)]
            started = time.monotonic()
            for run_id in run_ids:
                assert (await push(client, {"run_id": run_id})).status_code == 503
            assert time.monotonic() - started < interval, "too slow to test within the interval"
            assert len(misconfigured_lines(lines)) == 1

            await asyncio.sleep(interval)
            assert (await push(client, {"run_id": run_ids[0]})).status_code == 503
            assert len(misconfigured_lines(lines)) == 2
    assert len(llm.calls("expand")) == 3


async def test_request_specific_400_fails_the_run_with_the_providers_reason(
    app_client: AppClient, llm: FakeOpenAI
) -> None:
    app, client = app_client
    reason = "This model's maximum context length is 128000 tokens. You requested 131000 tokens."
    error = {
        "message": reason,
        "type": "invalid_request_error",
        "param": "input",
        "code": "context_length_exceeded",
    }
    llm.queue("review_critic", Reply(400, body={"error": error}))
    run_id = await new_run(app)

    assert (await push(client, {"run_id": run_id})).status_code == 204

    run = await run_json(client, run_id)
    assert run["status"] == "failed"
    assert "HTTP 400" in run["error_message"]
    assert reason in run["error_message"]
    assert len(llm.calls("review_critic")) == 1


async def test_a_call_queued_for_a_slot_neither_times_out_nor_spends_an_attempt(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> None:
    # One call at a time, each taking 0.3 s: the fifth review waits 1.2 s for its slot, more
    # than twice the step timeout, and must still go through on its first attempt.
    answer = 0.3
    settings = make_settings(llm_max_concurrency=1, worker_step_timeout_seconds=0.5)
    for step in STEP_NAMES[:-1]:
        llm.step_delay[step] = answer
    async with running_app(settings) as (app, client):
        run_id = await new_run(app)
        assert (await push(client, {"run_id": run_id})).status_code == 204
        run = await run_json(client, run_id)
    assert run["status"] == "completed"
    assert all(s["attempts"] == 1 for s in run["step_progress"])
    arrivals = sorted(call.at for call in llm.calls())
    assert len(arrivals) == 6
    # One at a time: each request arrives only after the previous one was answered.
    assert all(b - a >= answer * 0.95 for a, b in itertools.pairwise(arrivals))
    assert arrivals[-1] - arrivals[1] > 2 * settings.worker_step_timeout_seconds


# --- the retry policy and the Retry-After header, as units ----------------------------------


def test_retry_after_is_waited_with_jitter_above_it() -> None:
    policy = RetryPolicy(max_retries=3, initial_backoff=1.0, multiplier=2.0, max_backoff=10.0)
    delays = [policy.delay(1, 3.0) for _ in range(50)]
    assert all(d is not None and 3.0 <= d <= 3.0 + 0.5 * 2.0 for d in delays)
    assert len(set(delays)) > 1  # calls limited together do not retry at the same instant


def test_backoff_without_retry_after_is_jittered_and_capped() -> None:
    policy = RetryPolicy(max_retries=5, initial_backoff=1.0, multiplier=2.0, max_backoff=3.0)
    first = [policy.delay(0, None) for _ in range(50)]
    assert all(d is not None and 0.5 <= d <= 1.0 for d in first)
    assert len(set(first)) > 1
    assert all(
        d is not None and 1.5 <= d <= 3.0 for d in (policy.delay(4, None) for _ in range(50))
    )


def test_retry_policy_gives_up() -> None:
    policy = RetryPolicy(max_retries=2, initial_backoff=1.0, multiplier=2.0, max_backoff=10.0)
    assert policy.delay(2, None) is None
    assert policy.delay(2, 1.0) is None
    # A Retry-After beyond max_backoff is left to Pub/Sub's redelivery.
    assert policy.delay(0, 10.5) is None
    assert policy.delay(0, 10.0) is not None


def test_retry_after_header_forms() -> None:
    assert retry_after_seconds({"retry-after": "1"}) == 1.0
    assert retry_after_seconds({"retry-after-ms": "800", "retry-after": "5"}) == 0.8
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    seconds = retry_after_seconds({"retry-after": date})
    assert seconds is not None and 28.0 < seconds <= 30.0
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert retry_after_seconds({"retry-after": past}) == 0.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None
