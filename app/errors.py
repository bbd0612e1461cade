"""The service's exceptions: one root, split by what the caller should do next.

Transient failures may succeed on redelivery (the push answer is 503); permanent ones will not
(the run is marked failed and the message acknowledged).
"""

from __future__ import annotations


class ConsensusError(Exception):
    """Root of every error the service raises on purpose."""


class TransientError(ConsensusError):
    """Worth trying again later: the delivery answers 503 and Pub/Sub redelivers."""


class PermanentError(ConsensusError):
    """Will not succeed by retrying: the run is failed and the message acknowledged."""


class InvalidRunInput(PermanentError):
    """The run's stored input fails validation; no delivery can fix it."""


class StepFailedTransient(TransientError):
    """A pipeline step gave up after its retries on errors that may pass."""


class StepFailedPermanent(PermanentError):
    """A pipeline step failed in a way that retrying cannot fix."""


class ProviderMisconfigured(TransientError):
    """The LLM provider rejects every request (bad key, no access, unknown model) until fixed."""


class StoreUnavailable(TransientError):
    """The database could not be reached or the connection broke."""


class LeaseLost(TransientError):
    """Another delivery took over the run's lease while this one was working."""


class LeaseExpired(TransientError):
    """The lease could not be renewed before it expired (the database stopped answering)."""


class DeadlineReached(TransientError):
    """The delivery's own budget ran out; the checkpoint is kept for the next delivery."""
