"""What the pipeline needs from a language model, and how a call can fail."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

from pydantic import BaseModel

from app.domain.models import TokenUsage

T = TypeVar("T", bound=BaseModel)


@dataclass(frozen=True)
class LLMRequest(Generic[T]):
    """One structured-output call. `client_request_id` is `<run_id>/<step>/<attempt>`."""

    step: str
    model: str
    temperature: float
    instructions: str
    input: str
    output_type: type[T]
    client_request_id: str


@dataclass(frozen=True)
class LLMResult(Generic[T]):
    output: T
    usage: TokenUsage
    model: str


class LLMErrorKind(StrEnum):
    """What a failed call tells the caller to do next."""

    RETRYABLE = "retryable"  # the same call may succeed if repeated (429, 5xx, timeout, garbage)
    PERMANENT = "permanent"  # this request can never succeed (a 400 about it, a refusal)
    MISCONFIGURED = "misconfigured"  # no request can succeed until the key or model is fixed


@dataclass
class LLMCallError(Exception):
    """One call failed; `kind` is decided by the adapter that saw the provider's answer."""

    message: str
    kind: LLMErrorKind
    retry_after: float | None = None
    usage: TokenUsage = field(default_factory=TokenUsage)

    def __str__(self) -> str:
        return self.message


class LLM(Protocol):
    """A structured-output language model (the OpenAI adapter or the offline provider)."""

    def slot(self) -> AbstractAsyncContextManager[None]:
        """One of the process-wide concurrent-call slots; hold it around `generate`.

        Separate from `generate` so a caller can time the call itself, not the queueing.
        """
        ...

    async def generate(self, request: LLMRequest[T]) -> LLMResult[T]:
        """Send one request; call it only while holding a `slot()`."""
        ...
