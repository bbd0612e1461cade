"""The OpenAI Responses API adapter (structured outputs through `responses.parse`)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from typing import Any

import openai
from pydantic import ValidationError

from app.domain.llm import LLMCallError, LLMRequest, LLMResult, T
from app.domain.models import TokenUsage

# Status codes worth repeating: timeouts, conflicts, rate limits and server errors.
_RETRYABLE_STATUS = frozenset({408, 409, 429})


def build_client(api_key: str, base_url: str | None, timeout_seconds: float) -> openai.AsyncOpenAI:
    """An SDK client with its own retries off: the pipeline's retry policy is the only one."""
    return openai.AsyncOpenAI(
        api_key=api_key, base_url=base_url, timeout=timeout_seconds, max_retries=0
    )


class OpenAIProvider:
    """Implements the domain's `LLM` protocol; bounds concurrent calls process-wide."""

    def __init__(self, client: openai.AsyncOpenAI, max_concurrency: int, store: bool = False):
        self._client = client
        self._limit = asyncio.Semaphore(max_concurrency)
        self._store = store

    async def aclose(self) -> None:
        await self._client.close()

    async def generate(self, request: LLMRequest[T]) -> LLMResult[T]:
        async with self._limit:
            try:
                raw = await self._client.responses.with_raw_response.parse(
                    model=request.model,
                    instructions=request.instructions,
                    input=request.input,
                    temperature=request.temperature,
                    text_format=request.output_type,
                    store=self._store,
                    extra_headers={"X-Client-Request-Id": request.client_request_id},
                )
            except openai.APIStatusError as exc:
                status = exc.status_code
                raise LLMCallError(
                    f"HTTP {status} from the LLM: {_short(exc.message)}",
                    retryable=status in _RETRYABLE_STATUS or status >= 500,
                    retry_after=retry_after_seconds(exc.response.headers),
                ) from exc
            except openai.APITimeoutError as exc:
                raise LLMCallError("LLM request timed out", retryable=True) from exc
            except openai.APIConnectionError as exc:
                raise LLMCallError(f"LLM connection failed: {exc}", retryable=True) from exc

        try:
            body = raw.http_response.json()
        except ValueError as exc:
            raise LLMCallError("LLM answered with a body that is not JSON", True) from exc
        if not isinstance(body, dict):
            raise LLMCallError("LLM answered with JSON that is not an object", True)
        usage = _usage(body.get("usage"))
        _raise_for_unusable(body, usage)
        try:
            parsed = raw.parse()
        except (ValidationError, ValueError, TypeError) as exc:
            raise LLMCallError(
                f"structured output did not match {request.output_type.__name__}: {_short(exc)}",
                retryable=True,
                usage=usage,
            ) from exc
        output = parsed.output_parsed
        if output is None:
            raise LLMCallError("response carried no structured output", True, usage=usage)
        return LLMResult(output=output, usage=usage, model=str(body.get("model", request.model)))


def _raise_for_unusable(body: dict[str, Any], usage: TokenUsage) -> None:
    """Refusals and incomplete responses are reported as such, not as parse errors."""
    for item in body.get("output") or []:
        if not isinstance(item, dict):
            continue
        for content in item.get("content") or []:
            if isinstance(content, dict) and content.get("type") == "refusal":
                reason = _short(content.get("refusal", ""))
                raise LLMCallError(f"the model refused: {reason}", retryable=False, usage=usage)
    if body.get("status") == "incomplete":
        details = body.get("incomplete_details") or {}
        reason = details.get("reason", "unknown") if isinstance(details, dict) else "unknown"
        raise LLMCallError(
            f"incomplete response ({reason})",
            retryable=reason != "content_filter",
            usage=usage,
        )


def _usage(raw: object) -> TokenUsage:
    if not isinstance(raw, dict):
        return TokenUsage()

    def count(key: str) -> int:
        value = raw.get(key)
        return value if isinstance(value, int) and value >= 0 else 0

    total = count("total_tokens") or count("input_tokens") + count("output_tokens")
    return TokenUsage(count("input_tokens"), count("output_tokens"), total)


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date), if any."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(float(millis) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _short(value: object, limit: int = 300) -> str:
    text = value if isinstance(value, str) else json.dumps(str(value))
    return text if len(text) <= limit else text[:limit] + "..."
