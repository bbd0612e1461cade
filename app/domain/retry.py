"""The retry policy for LLM calls: the only retry layer in the service."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 3
    initial_backoff: float = 1.0
    multiplier: float = 2.0
    max_backoff: float = 60.0

    def delay(self, retry_index: int, retry_after: float | None) -> float | None:
        """Seconds to wait before retry number `retry_index` (0-based); None means give up.

        Exponential backoff with jitter. With a Retry-After the wait is Retry-After plus up to
        half the backoff, so calls limited together do not all retry at the same instant; a
        Retry-After beyond `max_backoff` is left to Pub/Sub's redelivery instead.
        """
        if retry_index >= self.max_retries:
            return None
        if retry_after is not None and retry_after > self.max_backoff:
            return None
        backoff = min(self.initial_backoff * self.multiplier**retry_index, self.max_backoff)
        if retry_after is None:
            return backoff * random.uniform(0.5, 1.0)
        return retry_after + backoff * random.uniform(0.0, 0.5)
