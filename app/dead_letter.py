"""The dead-letter receiver (`POST /pubsub/dead-letter`): Pub/Sub gave up on a job, we do not.

Pub/Sub dead-letters a message after its subscription's maximum delivery attempts, however those
attempts were answered: 409 and 503 before any claim burn them too. So the attempt count decides
nothing here; the job timeout does. A dead-lettered job whose run is unfinished is re-enqueued
while `WORKER_JOB_TIMEOUT_SECONDS` allows, else failed with the reason. Every dead letter is
acknowledged and recorded in `dead_letters`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loguru import logger

from app.publish import Outbox
from app.push.envelope import MalformedPush, PushMessage, decode_push, parse_job
from app.push.policy import Outcome
from app.service import PushReceiver, run_end_fields
from app.store.recovery import RecoveryStore
from app.store.runs import RunStatus, RunStore
from app.sweep import queued

# Attributes Pub/Sub adds to a message it forwards to a dead-letter topic.
SOURCE_DELIVERY_COUNT = "CloudPubSubDeadLetterSourceDeliveryCount"
SOURCE_SUBSCRIPTION = "CloudPubSubDeadLetterSourceSubscription"
SOURCE_PROJECT = "CloudPubSubDeadLetterSourceSubscriptionProject"


class DeadLetterReceiver:
    def __init__(
        self,
        store: RunStore,
        recovery: RecoveryStore,
        outbox: Outbox,
        receiver: PushReceiver,
        job_timeout_seconds: float,
    ) -> None:
        self._store = store
        self._recovery = recovery
        self._outbox = outbox
        self._receiver = receiver
        self._job_timeout_seconds = job_timeout_seconds

    async def handle(self, body: bytes, headers: Mapping[str, str]) -> Outcome:
        """Decide and record; `StoreUnavailable` propagates (503: Pub/Sub tries again)."""
        try:
            message = decode_push(body, headers)
            job = parse_job(message)
        except MalformedPush as exc:
            return await self._receiver.reject(
                f"dead letter: {exc}", body, headers, exc.message_id, exc.subscription
            )

        attempts = _attempts(message)
        run_id = job.run_id
        if run_id is None:
            assert job.idea is not None
            run_id = await self._run_for_idea(message, job.idea, job.extra_context)

        state = await self._recovery.run_state(run_id)
        if state is None:
            return await self._receiver.reject(
                f"dead letter of unknown run_id {run_id}",
                body,
                headers,
                message.message_id,
                message.subscription,
            )
        elif state.status in (RunStatus.COMPLETED, RunStatus.FAILED):
            action, reason = "finished", f"run already {state.status}"
        elif state.leased:
            action, reason = "in_progress", "a delivery holds the run's live lease"
        elif state.elapsed_seconds >= self._job_timeout_seconds:
            action = "failed"
            reason = f"dead-lettered after {attempts or 'an unknown number of'} attempts"
            if not await self._recovery.fail_unleased(run_id, reason):
                action, reason = "in_progress", "the run was claimed or finished meanwhile"
        else:
            action = "requeued"
            reason = f"re-enqueued after {attempts or 'an unknown number of'} attempts"
            await self._recovery.mark_requeued(run_id)
            if not await self._outbox.publish(queued(state.job)):
                reason += "; the publish failed, the sweep retries it"

        await self._recovery.record_dead_letter(
            run_id,
            message.message_id,
            message.attributes.get(SOURCE_SUBSCRIPTION, message.subscription),
            attempts,
            action,
            reason,
        )
        log = logger.error if action == "failed" else logger.warning
        # A failed run's line carries what every job_failed line does (app/service.py).
        failed = (
            {"error_message": reason, **await run_end_fields(self._store, run_id)}
            if action == "failed"
            else {}
        )
        log(
            "dead letter: {}",
            reason,
            run_id=run_id,
            lifecycle_event="job_failed" if action == "failed" else "dead_lettered",
            dead_letter_action=action,
            message_id=message.message_id,
            delivery_attempt=attempts,
            **failed,
        )
        return Outcome.DEAD_LETTER_RECORDED

    async def _run_for_idea(
        self, message: PushMessage, idea: str, extra_context: str | dict[str, Any] | None
    ) -> str:
        """The run of a self-contained job: the one its original deliveries created when it
        can be found, else one created now (keyed by this dead letter, so it is made once)."""
        subscription = message.attributes.get(SOURCE_SUBSCRIPTION)
        project = message.attributes.get(SOURCE_PROJECT)
        if subscription and message.message_id:
            candidates = [f"{subscription}/{message.message_id}"]
            if project and not subscription.startswith("projects/"):
                full = f"projects/{project}/subscriptions/{subscription}"
                candidates.insert(0, f"{full}/{message.message_id}")
            for key in candidates:
                run = await self._store.run_by_source(key)
                if run is not None:
                    return run.id
        assert message.source_key is not None  # parse_job checked it for idea jobs
        run, _ = await self._store.run_for_message(message.source_key, idea, extra_context)
        return run.id


def _attempts(message: PushMessage) -> int | None:
    raw = message.attributes.get(SOURCE_DELIVERY_COUNT)
    if raw is not None and raw.isdigit() and len(raw) < 10:
        return int(raw)
    return message.delivery_attempt
