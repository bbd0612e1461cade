"""What the pipeline needs from a language model, and how a call can fail."""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class LLMCallError(Exception):
    """One call failed. `retryable` says whether the same call may succeed if repeated."""

    message: str
    retryable: bool
    retry_after: float | None = None
    usage: TokenUsage = field(default_factory=TokenUsage)

    def __str__(self) -> str:
        return self.message


class LLM(Protocol):
    """A structured-output language model (the OpenAI adapter or the offline provider)."""

    async def generate(self, request: LLMRequest[T]) -> LLMResult[T]: ...
