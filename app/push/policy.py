"""The acknowledgement policy: what each delivery outcome answers to Pub/Sub (SPEC §3.4)."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    COMPLETED = "completed"  # pipeline completed in this delivery
    ALREADY_DONE = "already_done"  # duplicate delivery of a finished run
    LEASE_BUSY = "lease_busy"  # another delivery holds a live lease
    REJECTED = "rejected"  # malformed envelope or job: quarantined
    RETRY = "retry"  # transient failure: checkpoint kept, lease released
    FAILED = "failed"  # permanent failure: run marked failed
    OVERLOADED = "overloaded"  # this instance is at WORKER_MAX_CONCURRENCY
    SHUTTING_DOWN = "shutting_down"  # SIGTERM received: no new claims
    DEAD_LETTER_RECORDED = "dead_letter_recorded"  # re-enqueued, failed or already finished
    DEFERRED = "deferred"  # daily budget spent, run not started: left for the sweep


ACK_POLICY: dict[Outcome, int] = {
    Outcome.COMPLETED: 204,
    Outcome.ALREADY_DONE: 204,
    Outcome.LEASE_BUSY: 409,
    # Acknowledged on purpose: a poison message would otherwise be redelivered forever.
    Outcome.REJECTED: 204,
    Outcome.RETRY: 503,
    Outcome.FAILED: 204,
    Outcome.OVERLOADED: 503,
    Outcome.SHUTTING_DOWN: 503,
    Outcome.DEAD_LETTER_RECORDED: 204,
    # Acknowledged: the run waits, queued, and the sweep re-enqueues it in the budget's next
    # day; a redelivery now would only be deferred again.
    Outcome.DEFERRED: 204,
}


def status_for(outcome: Outcome) -> int:
    """HTTP status for the push response; 2xx acknowledges, anything else redelivers."""
    return ACK_POLICY[outcome]
