"""The service's production log lines, captured from real runs, for the monitoring checks.

`captured_lines()` starts the app once on the test database with the fake OpenAI server and
production logging (the JSON lines Cloud Logging reads from a container's stdout), plays a
scenario that makes the service write every event the log-based metrics
(infra/monitoring/metrics/) and the runbook's log queries (docs/OPERATIONS.md) read, and returns
the lines it wrote to stdout, parsed. Nothing in them is written by hand:

- `worker.started` at start-up (the instance_starts metric);
- `provider_misconfigured` and a `step_failed` from a 401 on a run's first delivery;
- a run leased by another instance (`lease_busy`), then completed (`job_started`, `step_*`,
  `job_completed`), then delivered again (`idempotent_skip`);
- the expand step on a model without a price (`price_unknown`; its lines' `cost_usd` is null),
  the reviews on priced gpt-5.1, the aggregate step calling no model (cost 0);
- a tiny DAILY_BUDGET_USD, spent by that run: the first delivery of a high-priority run already
  started goes on (`budget_exhausted`), its critic refuses (`step_failed`, `job_failed`), and a
  run not started yet is deferred (`job_deferred`);
- `job_failed` from the sweep's job timeout and from a dead letter (no delivery of their own);
- a push whose data is not JSON (`message_rejected`).

The capture (about a second) runs once per test session, for whichever test module asks first
(through a session fixture of its own).
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI

import app.cost
import app.main
from app.llm import openai_provider
from app.logs import configure_logging
from app.push.envelope import encode_wrapped
from app.settings import Settings
from tests.conftest import queued_an_hour_ago, running_app, services_of
from tests.fakes.openai_server import FakeOpenAI, Reply

Json = dict[str, Any]

PROJECT = "test-project"
SUBSCRIPTION = "projects/test-project/subscriptions/consensus-engine-jobs-sub"
UNPRICED_MODEL = "my-private-model"
INVALID_KEY = {
    "error": {
        "message": "Incorrect API key provided: sk-te**. You can find your API key at ...",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}


# The lines of this session's capture, shared by the test modules that ask for them.
_captured: list[Json] = []


async def captured_lines(pg_url: str, fake: FakeOpenAI) -> list[Json]:
    """The JSON lines the service wrote to stdout in the capture scenario, parsed; captured on
    the first call of the test session (`pg_url`, `fake`: the session's database and fake)."""
    if not _captured:
        _captured.extend(await capture(pg_url, fake))
    return list(_captured)


def _settings(pg_url: str, fake: FakeOpenAI) -> Settings:
    return Settings(
        _env_file=None,
        env="testing",
        database_url=pg_url,
        llm_provider="openai",
        openai_api_key="sk-test",
        openai_base_url=fake.url,
        expand_model=UNPRICED_MODEL,
        max_retries_per_persona=0,
        retry_initial_backoff_seconds=0.01,
        push_auth="none",
        log_level="INFO",
        # Any run's reviews spend it (five gpt-5.1 calls of the fake: 0.003125 USD).
        daily_budget_usd=0.001,
        worker_job_timeout_seconds=60,
        # Nothing runs behind the scenario's back.
        sweep_interval_seconds=3600,
    )


async def capture(pg_url: str, fake: FakeOpenAI) -> list[Json]:
    stdout = io.StringIO()
    fake.reset()
    with pytest.MonkeyPatch.context() as patch:
        # What ENV=production selects, without the production settings' other requirements
        # (OIDC push authentication, a Pub/Sub project): the service's own JSON sink.
        patch.setattr(
            app.main,
            "configure_logging",
            lambda production, level, project_id: configure_logging(True, level, PROJECT),
        )
        # Every delivery reads the day's spend (no reading reused for 10 s).
        patch.setattr(app.cost, "SPEND_CHECK_SECONDS", 0.0)
        # Process-wide: an earlier test's 401 must not have used up this line.
        patch.setattr(
            openai_provider,
            "_misconfigured_log",
            openai_provider.LogThrottle(openai_provider.MISCONFIGURED_LOG_INTERVAL_SECONDS),
        )
        try:
            with contextlib.redirect_stdout(stdout):
                async with running_app(_settings(pg_url, fake)) as (service, client):
                    await _scenario(service, client, fake)
        finally:
            configure_logging(False, "WARNING", None)
            fake.reset()
    lines = []
    for number, text in enumerate(stdout.getvalue().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            pytest.fail(
                f"stdout line {number} is not JSON (Cloud Logging would not parse it): {text}"
            )
        assert isinstance(line, dict), text
        lines.append(line)
    return lines


async def _scenario(service: FastAPI, client: httpx2.AsyncClient, fake: FakeOpenAI) -> None:
    services = services_of(service)
    store = services.store
    trace = 0

    async def push(run_id: str, message_id: str, attempt: int) -> int:
        nonlocal trace
        trace += 1
        body = encode_wrapped({"run_id": run_id}, message_id, SUBSCRIPTION, attempt)
        headers = {"x-cloud-trace-context": f"{trace:032x}/1;o=1"}
        response = await client.post("/pubsub/push", content=body, headers=headers)
        return response.status_code

    # Runs past the job timeout: the sweep fails one, a dead letter the other.
    stuck = await store.create_run("A seed library in the school hall.", None)
    await queued_an_hour_ago(service, stuck)
    assert (await services.sweeper.sweep_once()).timed_out == 1
    dead = await store.create_run("A repair café every other Saturday.", None)
    await queued_an_hour_ago(service, dead)
    body = json.loads(encode_wrapped({"run_id": dead.id}, "m-dead", SUBSCRIPTION))
    body["message"]["attributes"] = {"CloudPubSubDeadLetterSourceDeliveryCount": "5"}
    answer = await client.post("/pubsub/dead-letter", content=json.dumps(body).encode())
    assert answer.status_code == 204, answer.text

    # The key is refused on a high-priority run's first delivery: it waits, started.
    refused = await store.create_run("A bike library.", None, priority="high")
    fake.outage(401, body=INVALID_KEY)
    assert await push(refused.id, "m-refused-1", 1) == 503
    fake.outage(None)

    # Another instance holds a run's lease: a delivery meanwhile is told so. Released, the run
    # completes on its next delivery; a duplicate of that delivery is acknowledged.
    ok = await store.create_run("A tool library.", None)
    elsewhere = "another-instance/1"
    await store.claim(ok.id, elsewhere, 60, 1)
    assert await push(ok.id, "m-ok-1", 1) == 409
    await store.release(ok.id, elsewhere, "instance shut down; checkpoint kept")
    assert await push(ok.id, "m-ok-2", 2) == 204
    assert await push(ok.id, "m-ok-2", 2) == 204

    # The budget is spent now: the started run goes on, and its critic refuses.
    fake.queue("review_critic", Reply(refusal="I cannot review this."))
    assert await push(refused.id, "m-refused-2", 2) == 204
    # A run not started yet waits for the next budget day.
    later = await store.create_run("A shared sewing machine.", None)
    assert await push(later.id, "m-later", 1) == 204

    # Data that is not JSON: quarantined.
    envelope = json.loads(encode_wrapped({}, "m-garbage", SUBSCRIPTION, 1))
    envelope["message"]["data"] = "bm90IGpzb24="  # "not json"
    answer = await client.post("/pubsub/push", content=json.dumps(envelope).encode())
    assert answer.status_code == 204, answer.text
