"""`python -m app.ops dead-letters [--replay RUN_ID | --replay-all]` against the real Pub/Sub
emulator and PostgreSQL: dead letters are listed without being taken, replayed once each, and a
replayed run completes when its job is delivered.

The emulator has no dead-letter policy, so the tests publish to the dead-letter topic what
Pub/Sub would forward there: the job with the `CloudPubSubDeadLetter*` attributes.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from typing import Any

import httpx2
import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.domain.personas import EXPAND_STEP, STEP_NAMES
from app.ops import DeadLetterSubscription, dead_letters_report, replay_dead_letters
from app.publish import Outbox, PubSubPublisher
from app.settings import Settings
from app.store.recovery import DeadLetterRef, RecoveryStore, ReplayOutcome
from app.store.runs import RunStore, utcnow
from app.store.tables import DeadLetter, Run, StepProgress
from tests.conftest import StartApp, running_app
from tests.emulator import PROJECT, PubSubEmulator
from tests.fakes.openai_server import FakeOpenAI
from tests.procs import ROOT, eventually

REVIEW_FAILED, REVIEW_RUNNING = STEP_NAMES[1], STEP_NAMES[2]
TIMED_OUT = "job timeout of 1800s exceeded; last error: HTTP 429 from the LLM"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PubSubEmulator]:
    server = PubSubEmulator(tmp_path_factory.mktemp("dead-letters") / "emulator.log").start()
    try:
        yield server
    finally:
        server.stop()


class Topology:
    """One test's topics on the emulator: the jobs topics, each with a pull subscription that
    records what was published to it, and the dead-letter topic with its keeping subscription."""

    def __init__(self, emulator: PubSubEmulator) -> None:
        self._base = f"http://{emulator.host}/v1/projects/{PROJECT}"
        name = f"t{uuid.uuid4().hex[:8]}"
        self.jobs, self.high, self.dlq = f"{name}-jobs", f"{name}-jobs-high", f"{name}-dlq"
        self.keep = f"{self.dlq}-sub"
        self.source = f"projects/{PROJECT}/subscriptions/{self.jobs}-sub"
        for topic in (self.jobs, self.high, self.dlq):
            self._put(f"topics/{topic}", {})
        for topic, subscription in (
            (self.jobs, f"{self.jobs}-pull"),
            (self.high, f"{self.high}-pull"),
            (self.dlq, self.keep),
        ):
            body = {"topic": f"projects/{PROJECT}/topics/{topic}", "ackDeadlineSeconds": 10}
            self._put(f"subscriptions/{subscription}", body)

    def _put(self, path: str, body: dict[str, Any]) -> None:
        response = httpx2.put(f"{self._base}/{path}", json=body, timeout=10)
        assert response.status_code == 200, response.text

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = httpx2.post(f"{self._base}/{path}", json=body, timeout=30)
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    def dead_letter(self, job: dict[str, Any] | bytes, attempts: int = 5) -> str:
        """What Pub/Sub forwards after `attempts` deliveries; its message id."""
        data = job if isinstance(job, bytes) else json.dumps(job).encode()
        message = {
            "data": base64.b64encode(data).decode(),
            "attributes": {
                "CloudPubSubDeadLetterSourceDeliveryCount": str(attempts),
                "CloudPubSubDeadLetterSourceSubscription": self.source,
            },
        }
        [message_id] = self._post(f"topics/{self.dlq}:publish", {"messages": [message]})[
            "messageIds"
        ]
        return str(message_id)

    def published(self, topic: str) -> list[dict[str, Any]]:
        """The jobs published to `topic` since the last look (taken off its pull subscription)."""
        jobs: list[dict[str, Any]] = []
        while True:
            answer = self._post(
                f"subscriptions/{topic}-pull:pull", {"maxMessages": 100, "returnImmediately": True}
            )
            received = answer.get("receivedMessages", [])
            if not received:
                return jobs
            jobs.extend(json.loads(base64.b64decode(r["message"]["data"])) for r in received)
            ack_ids = [r["ackId"] for r in received]
            self._post(f"subscriptions/{topic}-pull:acknowledge", {"ackIds": ack_ids})


@pytest.fixture
def topology(emulator: PubSubEmulator, monkeypatch: pytest.MonkeyPatch) -> Topology:
    # The client libraries read the emulator's address from the environment.
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator.host)
    return Topology(emulator)


@pytest.fixture
async def engine(pg_url: str, store: RunStore) -> AsyncIterator[AsyncEngine]:
    """An engine on the test database, emptied by `store`."""
    engine = create_async_engine(pg_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def recovery(engine: AsyncEngine) -> RecoveryStore:
    return RecoveryStore(engine)


@pytest.fixture
def dead_letters(topology: Topology, emulator: PubSubEmulator) -> Iterator[DeadLetterSubscription]:
    subscription = DeadLetterSubscription(PROJECT, topology.keep, emulator.host)
    try:
        yield subscription
    finally:
        subscription.close()


@pytest.fixture
async def outbox(
    topology: Topology, emulator: PubSubEmulator, recovery: RecoveryStore
) -> AsyncIterator[Outbox]:
    publisher = PubSubPublisher(PROJECT, topology.jobs, topology.high, emulator.host)
    try:
        yield Outbox(recovery, publisher)
    finally:
        await publisher.aclose()


async def set_run(engine: AsyncEngine, run_id: str, **values: object) -> None:
    async with engine.begin() as connection:
        await connection.execute(update(Run).where(Run.id == run_id).values(**values))


async def set_step(engine: AsyncEngine, run_id: str, step: str, **values: object) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            update(StepProgress)
            .where(StepProgress.run_id == run_id, StepProgress.step_name == step)
            .values(**values)
        )


async def failed_by_time(
    store: RunStore, engine: AsyncEngine, error: str = TIMED_OUT, priority: str = "normal"
) -> str:
    """A run the job timeout failed an hour in: expand done, a review failed after three
    attempts, another interrupted."""
    run = await store.create_run("A tool library for the street.", None)
    now = utcnow()
    await set_run(
        engine,
        run.id,
        status="failed",
        error_message=error,
        priority=priority,
        started_at=now - timedelta(hours=1),
        completed_at=now,
        published_at=now - timedelta(hours=1),
        delivery_count=5,
    )
    await set_step(engine, run.id, EXPAND_STEP, status="completed", attempts=1)
    await set_step(engine, run.id, REVIEW_FAILED, status="failed", attempts=3, error_message="429")
    await set_step(engine, run.id, REVIEW_RUNNING, status="running", attempts=1, started_at=now)
    return run.id


def job(run_id: str, priority: str = "normal") -> dict[str, str]:
    return {"run_id": run_id, "run_type": "initial", "priority": priority}


def block(text: str, message_id: str) -> str:
    """The lines the listing prints for one dead letter."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if f"message_id={message_id} " in line)
    end = start + 1
    while end < len(lines) and lines[end].startswith("    "):
        end += 1
    return "\n".join(lines[start:end])


async def status(store: RunStore, run_id: str) -> str:
    run = await store.get_run(run_id)
    assert run is not None
    return run.status


async def actions(engine: AsyncEngine, run_id: str) -> list[str]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(DeadLetter.action).where(DeadLetter.run_id == run_id).order_by(DeadLetter.id)
        )
        return [row[0] for row in rows]


async def test_the_listing_shows_each_dead_letter_with_its_run_and_takes_none(
    topology: Topology,
    dead_letters: DeadLetterSubscription,
    store: RunStore,
    engine: AsyncEngine,
    recovery: RecoveryStore,
) -> None:
    failed = await failed_by_time(store, engine)
    done = (await store.create_run("A finished idea.", None)).id
    await set_run(engine, done, status="completed")
    failed_letter = topology.dead_letter(job(failed), attempts=5)
    done_letter = topology.dead_letter({"run_id": done}, attempts=7)
    idea = {"idea": "A repair café finder for the neighbourhood."}
    idea_letter = topology.dead_letter(idea)
    idea_run, _ = await store.run_for_message(
        f"{topology.source}/{idea_letter}", idea["idea"], None
    )
    orphan_letter = topology.dead_letter({"idea": "An idea no receiver has seen yet."})
    garbage_letter = topology.dead_letter(b"\x00 not a job")
    # What the dead-letter receiver recorded when the failed run's dead letter reached it.
    await recovery.record_dead_letter(
        failed, failed_letter, topology.source, 5, "failed", "dead-lettered after 5 attempts"
    )

    text = "\n".join(await dead_letters_report(dead_letters, store, recovery, 50))

    assert f"5 dead letter(s) waiting on projects/{PROJECT}/subscriptions/{topology.keep}" in text
    failed_block = block(text, failed_letter)
    assert f"attempts=5 source={topology.source}" in failed_block
    assert f"run {failed} failed" in failed_block
    assert f"last error: {TIMED_OUT}" in failed_block
    assert f"run {done} completed" in block(text, done_letter)
    assert "attempts=7" in block(text, done_letter)
    assert f"run {idea_run.id} queued" in block(text, idea_letter)
    assert "no run yet" in block(text, orphan_letter)
    assert "not a job" in block(text, garbage_letter)
    assert "1 dead letter(s) recorded in the database" in text
    assert f"run={failed} message_id={failed_letter} attempts=5" in text
    assert "failed: dead-lettered after 5 attempts" in text

    # Listing took nothing: all five wait still, nothing was published or changed.
    again = "\n".join(await dead_letters_report(dead_letters, store, recovery, 50))
    assert "5 dead letter(s) waiting" in again
    assert topology.published(topology.jobs) == []
    run = await store.get_run(failed)
    assert run is not None and run.status == "failed"


async def test_replaying_one_run_resets_it_publishes_its_job_once_and_acknowledges(
    topology: Topology,
    dead_letters: DeadLetterSubscription,
    outbox: Outbox,
    store: RunStore,
    engine: AsyncEngine,
    recovery: RecoveryStore,
) -> None:
    chosen = await failed_by_time(store, engine)
    other = await failed_by_time(store, engine)
    before = utcnow()
    chosen_letter = topology.dead_letter(job(chosen))
    topology.dead_letter(job(other))

    lines, ok = await replay_dead_letters(dead_letters, store, recovery, outbox, chosen)

    assert ok, lines
    assert f"run {chosen} (message_id {chosen_letter}): replayed" in "\n".join(lines)
    run = await store.get_run(chosen)
    assert run is not None
    assert (run.status, run.error_message, run.started_at, run.completed_at) == (
        "queued",
        None,
        None,
        None,
    )
    assert run.queued_at >= before - timedelta(seconds=5)  # the job timeout starts again
    assert run.published_at is not None and run.requeue_count == 1
    steps = {s.step_name: s for s in run.steps}
    assert steps[EXPAND_STEP].status == "completed"  # its checkpoint is kept
    assert (steps[REVIEW_FAILED].status, steps[REVIEW_FAILED].error_message) == ("pending", None)
    assert steps[REVIEW_FAILED].attempts == 3
    assert steps[REVIEW_RUNNING].status == "pending"
    assert topology.published(topology.jobs) == [job(chosen)]
    assert await actions(engine, chosen) == ["replayed"]

    # The other run's dead letter waits, untouched; the chosen one's is gone.
    untouched = await store.get_run(other)
    assert untouched is not None and untouched.status == "failed"
    text = "\n".join(await dead_letters_report(dead_letters, store, recovery, 50))
    assert "1 dead letter(s) waiting" in text and f"run {other} failed" in text

    # Again: nothing left to replay for it, nothing published.
    lines, ok = await replay_dead_letters(dead_letters, store, recovery, outbox, chosen)
    assert not ok
    assert f"no dead letter of run {chosen}" in "\n".join(lines)
    assert topology.published(topology.jobs) == []


async def test_replay_all_runs_again_only_what_time_failed_and_never_twice(
    topology: Topology,
    dead_letters: DeadLetterSubscription,
    outbox: Outbox,
    store: RunStore,
    engine: AsyncEngine,
    recovery: RecoveryStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    normal = await failed_by_time(store, engine)
    high = await failed_by_time(store, engine, priority="high")
    dead_lettered = await failed_by_time(store, engine, error="dead-lettered after 5 attempts")
    released = (await store.create_run("Released after a 503.", None)).id
    await set_run(engine, released, status="running", error_message="LLM 503", started_at=utcnow())
    done = (await store.create_run("Completed after all.", None)).id
    await set_run(engine, done, status="completed")
    refused = await failed_by_time(store, engine, error="expand failed: the model refused")
    busy = (await store.create_run("Someone works on it.", None)).id
    lease = {"lease_owner": "host:1/abc", "lease_expires_at": utcnow() + timedelta(minutes=5)}
    await set_run(engine, busy, status="running", started_at=utcnow(), **lease)
    for run_id in (normal, normal, dead_lettered, released, done, refused, busy):
        topology.dead_letter(job(run_id))  # `normal` dead-lettered twice
    topology.dead_letter(job(high, "high"))
    topology.dead_letter(b"not a job")

    # Every acknowledgement is lost: each replay finds all the dead letters again.
    async def lost(self: DeadLetterSubscription, ack_ids: list[str]) -> None:
        await self.release(ack_ids)

    with monkeypatch.context() as patch:
        patch.setattr(DeadLetterSubscription, "ack", lost)
        for _ in range(2):
            lines, ok = await replay_dead_letters(dead_letters, store, recovery, outbox, None)
            assert ok, lines
    text = "\n".join(lines)
    assert "9 dead letter(s)" in text and "8 to replay" in text
    assert text.count("acknowledged without a new job, replayed before") == 4

    assert sorted(j["run_id"] for j in topology.published(topology.jobs)) == sorted(
        [normal, dead_lettered, released]
    )
    assert topology.published(topology.high) == [job(high, "high")]
    for run_id in (normal, high, dead_lettered, released):
        assert await status(store, run_id) == "queued", run_id
    assert [await status(store, r) for r in (done, refused, busy)] == [
        "completed",
        "failed",
        "running",
    ]
    assert await actions(engine, normal) == ["replayed", "replayed"]  # one row per dead letter
    assert await actions(engine, done) == ["finished"]
    assert await actions(engine, refused) == ["finished"]
    assert await actions(engine, busy) == ["in_progress"]

    # With acknowledgements working, a third replay takes them off and publishes nothing.
    lines, ok = await replay_dead_letters(dead_letters, store, recovery, outbox, None)
    assert ok, lines
    assert topology.published(topology.jobs) == [] and topology.published(topology.high) == []
    text = "\n".join(await dead_letters_report(dead_letters, store, recovery, 50))
    assert "1 dead letter(s) waiting" in text and "not a job" in text


async def test_the_sweeps_timeout_is_replayable_and_a_content_failure_is_not(
    make_settings: Callable[..., Settings],
    store: RunStore,
    engine: AsyncEngine,
    recovery: RecoveryStore,
) -> None:
    """The wording of the failures a replay may undo comes from the sweep and the receiver
    (the receiver's is exercised end to end below)."""
    async with running_app(make_settings(worker_job_timeout_seconds=60)) as (_, client):
        run_id = (await store.create_run("A run the sweep times out.", None)).id
        hour_ago = utcnow() - timedelta(hours=1)
        await set_run(engine, run_id, status="running", started_at=hour_ago, published_at=hour_ago)
        assert (await client.post("/tasks/sweep")).json()["timed_out"] == 1
    timed_out = await store.get_run(run_id)
    assert timed_out is not None and timed_out.status == "failed"
    replay = await recovery.replay(run_id, [DeadLetterRef("m-1", None, 5)])
    assert replay.outcome is ReplayOutcome.REPLAYED, timed_out.error_message
    again = await recovery.replay(run_id, [DeadLetterRef("m-1", None, 5)])
    assert again.outcome is ReplayOutcome.ALREADY_REPLAYED

    refused = await failed_by_time(store, engine, error="expand failed: the model refused")
    replay = await recovery.replay(refused, [DeadLetterRef("m-2", None, 5)])
    assert replay.outcome is ReplayOutcome.FINISHED
    assert await status(store, refused) == "failed"


def ops(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.ops", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_a_run_the_receiver_failed_is_replayed_from_the_command_line_and_completes(
    emulator: PubSubEmulator,
    topology: Topology,
    start_app: StartApp,
    store: RunStore,
    engine: AsyncEngine,
    pg_url: str,
    llm: FakeOpenAI,
) -> None:
    app = start_app(PUBSUB_EMULATOR_HOST=emulator.host, PUBSUB_TOPIC=topology.jobs)
    emulator.create_push_subscription(
        f"{topology.jobs}-push", topology.jobs, f"{app.url}/pubsub/push"
    )
    run_id = (await store.create_run("A seed library for the school.", None)).id
    hour_ago = utcnow() - timedelta(hours=1)
    await set_run(
        engine,
        run_id,
        status="running",
        started_at=hour_ago,
        published_at=hour_ago,
        error_message="HTTP 429 from the LLM",
    )
    # Pub/Sub gave up on the run's job: the dead-letter push subscription hands it to the
    # receiver, which fails it (past the job timeout); the keeping subscription keeps a copy.
    letter = job(run_id)
    message_id = topology.dead_letter(letter, attempts=5)
    envelope = {
        "message": {
            "data": base64.b64encode(json.dumps(letter).encode()).decode(),
            "messageId": message_id,
            "attributes": {"CloudPubSubDeadLetterSourceDeliveryCount": "5"},
        },
        "subscription": f"projects/{PROJECT}/subscriptions/{topology.dlq}-push",
    }
    async with httpx2.AsyncClient(base_url=app.url, timeout=30) as client:
        answer = await client.post("/pubsub/dead-letter", json=envelope)
    assert answer.status_code == 204
    failed = await store.get_run(run_id)
    assert failed is not None and failed.status == "failed"

    env = {
        "DATABASE_URL": pg_url,
        "PUBSUB_PROJECT_ID": PROJECT,
        "PUBSUB_EMULATOR_HOST": emulator.host,
        "PUBSUB_TOPIC": topology.jobs,
        "PUBSUB_DLQ_SUBSCRIPTION": topology.keep,
        "LOG_LEVEL": "WARNING",
    }
    listing = ops("dead-letters", **env)
    assert listing.returncode == 0, listing.stderr
    assert f"run {run_id} failed" in listing.stdout
    assert "last error: dead-lettered after 5 attempts; last error: HTTP 429" in listing.stdout
    assert "failed: dead-lettered after 5 attempts" in listing.stdout  # the receiver's row

    replay = ops("dead-letters", "--replay", run_id, **env)
    assert replay.returncode == 0, replay.stderr
    assert "replayed as a normal-priority job" in replay.stdout

    async def completed() -> bool:
        run = await store.get_run(run_id)
        return run is not None and run.status == "completed"

    await eventually(completed, 60, "the replayed run to complete")
    assert len(llm.calls()) == 6

    again = ops("dead-letters", "--replay-all", **env)
    assert again.returncode == 0, again.stderr
    assert "0 dead letter(s)" in again.stdout
    assert "0 dead letter(s) waiting" in ops("dead-letters", **env).stdout
    assert len(llm.calls()) == 6


def test_pubsub_out_of_reach_is_said_plainly(pg_url: str) -> None:
    result = ops(
        "dead-letters",
        DATABASE_URL=pg_url,
        PUBSUB_PROJECT_ID=PROJECT,
        PUBSUB_EMULATOR_HOST="127.0.0.1:9",  # nothing listens there
    )
    assert result.returncode == 1
    assert "Pub/Sub refused or did not answer" in result.stderr
    assert "Traceback" not in result.stderr
