"""A real uvicorn process killed mid-run, and one stopped by SIGTERM: nothing lost or run twice."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx2
import pytest

from app.push.envelope import encode_wrapped
from app.store.runs import RunStore
from app.store.tables import Run
from tests.conftest import StartApp
from tests.fakes.openai_server import USAGE, FakeOpenAI
from tests.procs import AppProcess, eventually
from tests.test_push_pipeline import SUBSCRIPTION

SLOW_PERSONAS = ("optimist", "security_guardian", "user_advocate")


async def deliver(url: str, body: bytes) -> int:
    async with httpx2.AsyncClient(timeout=60) as client:
        return (await client.post(f"{url}/pubsub/push", content=body)).status_code


async def start_slow_run(
    store: RunStore, llm: FakeOpenAI, process: AppProcess
) -> tuple[Run, bytes, asyncio.Task[int]]:
    """Deliver a run whose three slow reviews hang, and wait until they are in flight."""
    for persona in SLOW_PERSONAS:
        llm.step_delay[f"review_{persona}"] = 30.0
    run = await store.create_run("A community tool library.", None)
    body = encode_wrapped({"run_id": run.id}, "m-lifecycle", SUBSCRIPTION)
    in_flight = asyncio.create_task(deliver(process.url, body))

    async def all_calls_in_flight() -> bool:
        return len(llm.calls()) == 6

    async def fast_steps_checkpointed() -> bool:
        stored = await store.get_run(run.id)
        return stored is not None and sum(s.status == "completed" for s in stored.steps) >= 3

    await eventually(all_calls_in_flight, 20, "all six LLM calls in flight")
    await eventually(fast_steps_checkpointed, 10, "expand and two reviews checkpointed")
    return run, body, in_flight


async def redeliver_until_acknowledged(url: str, body: bytes, seconds: float) -> list[int]:
    statuses = []
    for _ in range(int(seconds / 0.2)):
        statuses.append(await deliver(url, body))
        if statuses[-1] == 204:
            return statuses
        await asyncio.sleep(0.2)
    raise AssertionError(f"never acknowledged: {statuses}")


async def test_sigkill_mid_reviews_then_redelivery_resumes_from_checkpoints(
    store: RunStore, llm: FakeOpenAI, start_app: StartApp
) -> None:
    first = start_app()
    run, body, in_flight = await start_slow_run(store, llm, first)

    first.signal(signal.SIGKILL)
    first.wait(timeout=10)
    killed_at = time.monotonic()
    with pytest.raises(httpx2.HTTPError):
        await in_flight
    llm.step_delay.clear()

    second = start_app()
    statuses = await redeliver_until_acknowledged(second.url, body, 20)
    recovery = time.monotonic() - killed_at

    result = await store.get_run(run.id)
    assert result is not None
    assert result.status == "completed", result.error_message
    assert statuses[-1] == 204 and set(statuses[:-1]) <= {409}
    steps = {s.step_name: s for s in result.steps}
    assert len(llm.calls("expand")) == 1
    assert steps["expand"].attempts == 1
    for persona in ("architect", "critic"):
        assert len(llm.calls(f"review_{persona}")) == 1
        assert steps[f"review_{persona}"].attempts == 1
    for persona in SLOW_PERSONAS:
        assert len(llm.calls(f"review_{persona}")) == 2
        assert steps[f"review_{persona}"].attempts == 2
    totals = await store.run_totals(run.id)
    assert totals is not None and totals.usage.total_tokens == 6 * USAGE["total_tokens"]
    assert result.delivery_count == 2
    assert len(result.reviews) == 5
    print(f"\nSIGKILL to completed after restart: {recovery:.2f}s")


async def test_sigterm_releases_in_flight_runs_and_a_new_process_resumes_at_once(
    store: RunStore, llm: FakeOpenAI, start_app: StartApp
) -> None:
    first = start_app()
    run, body, in_flight = await start_slow_run(store, llm, first)

    terminated_at = time.monotonic()
    first.signal(signal.SIGTERM)
    assert await asyncio.wait_for(in_flight, 10) == 503
    first.wait(timeout=10)
    shutdown = time.monotonic() - terminated_at
    assert shutdown < 10

    released = await store.get_run(run.id)
    assert released is not None
    assert released.lease_owner is None
    assert released.status == "running"
    assert "shut down" in (released.error_message or "")
    assert "released run on shutdown" in first.log()

    llm.step_delay.clear()
    second = start_app()
    resumed_at = time.monotonic()
    assert await deliver(second.url, body) == 204
    resume = time.monotonic() - resumed_at
    result = await store.get_run(run.id)
    assert result is not None and result.status == "completed"
    assert len(llm.calls("expand")) == 1
    print(f"\nSIGTERM to exit: {shutdown:.2f}s; redelivery to completed: {resume:.2f}s")
