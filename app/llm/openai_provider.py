"""The OpenAI Responses API adapter (structured outputs through `responses.parse`)."""

from __future__ import annotations

import asyncio
import email.utils
import functools
import json
import time
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

import openai
from loguru import logger
from openai.lib._parsing._responses import type_to_text_format_param
from openai.types.responses import ResponseFormatTextConfigParam
from pydantic import BaseModel, ValidationError

from app.domain.llm import LLMCallError, LLMErrorKind, LLMRequest, LLMResult, T
from app.domain.models import TokenUsage

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

# Status codes worth repeating: timeouts, conflicts, rate limits and server errors.
_RETRYABLE_STATUS = frozenset({408, 409, 429})
# The key, its access or the model is rejected: every request fails alike until someone fixes
# the configuration, so retrying now is pointless, yet the run itself is not at fault.
_MISCONFIGURED_STATUS = frozenset({401, 403, 404})
# One ERROR line per interval about it is enough, however many calls and deliveries hit it.
MISCONFIGURED_LOG_INTERVAL_SECONDS = 60.0


class LogThrottle:
    """Lets a log line through at most once per `interval` seconds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: float | None = None

    def allow(self) -> bool:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.interval:
            return False
        self._last = now
        return True


# Process-wide: every provider instance and every run share it.
_misconfigured_log = LogThrottle(MISCONFIGURED_LOG_INTERVAL_SECONDS)


@functools.cache
def _text_format(output_type: type[BaseModel]) -> ResponseFormatTextConfigParam:
    """The structured-output format of `output_type`, built once per type by the SDK's own
    builder (what `text_format=` calls), so the schema sent stays exactly the SDK's."""
    return type_to_text_format_param(output_type)


def build_client(
    api_key: str,
    base_url: str | None,
    timeout_seconds: float,
    tracer_provider: TracerProvider | None = None,
) -> openai.AsyncOpenAI:
    """An SDK client with its own retries off: the pipeline's retry policy is the only one.

    With `tracer_provider` (tracing on), every HTTP request it sends is a span, child of the
    LLM attempt's span, and carries `traceparent`.
    """
    http_client = None
    if tracer_provider is not None:
        from opentelemetry.instrumentation.httpx import HTTPX2ClientInstrumentor

        # The SDK's own defaults (connection limits, redirects), on a client we can instrument.
        http_client = openai.DefaultAsyncHttpxClient()
        HTTPX2ClientInstrumentor.instrument_client(http_client, tracer_provider=tracer_provider)
    return openai.AsyncOpenAI(
        api_key=api_key,
        base_url=base_url,
        timeout=timeout_seconds,
        max_retries=0,
        http_client=http_client,
    )


class OpenAIProvider:
    """Implements the domain's `LLM` protocol; `slot()` bounds concurrent calls process-wide."""

    def __init__(self, client: openai.AsyncOpenAI, max_concurrency: int, store: bool = False):
        self._client = client
        self._limit = asyncio.Semaphore(max_concurrency)
        self._store = store

    async def aclose(self) -> None:
        await self._client.close()

    def slot(self) -> AbstractAsyncContextManager[None]:
        return self._limit

    async def generate(self, request: LLMRequest[T]) -> LLMResult[T]:
        retryable = LLMErrorKind.RETRYABLE
        # Metadata only: the instructions and the input (the user's idea) stay out of the log.
        logger.debug(
            "llm request",
            step=request.step,
            model=request.model,
            temperature=request.temperature,
            client_request_id=request.client_request_id,
            input_chars=len(request.input),
            output_type=request.output_type.__name__,
        )
        try:
            raw = await self._client.responses.with_raw_response.parse(
                model=request.model,
                instructions=request.instructions,
                input=request.input,
                temperature=request.temperature,
                # The schema is built once per type: building the strict JSON schema anew for
                # every call cost milliseconds of CPU each.
                text={"format": _text_format(request.output_type)},
                store=self._store,
                extra_headers={"X-Client-Request-Id": request.client_request_id},
            )
        except openai.APIStatusError as exc:
            raise _status_error(exc, request.model) from exc
        except openai.APITimeoutError as exc:
            raise LLMCallError("LLM request timed out", retryable) from exc
        except openai.APIConnectionError as exc:
            raise LLMCallError(f"LLM connection failed: {exc}", retryable) from exc

        try:
            body = raw.http_response.json()
        except ValueError as exc:
            raise LLMCallError("LLM answered with a body that is not JSON", retryable) from exc
        if not isinstance(body, dict):
            raise LLMCallError("LLM answered with JSON that is not an object", retryable)
        usage = _usage(body.get("usage"))
        _raise_for_unusable(body, usage)
        text = _output_text(body)
        if text is None:
            raise LLMCallError("response carried no structured output", retryable, usage=usage)
        try:
            # The body is already decoded: validating its output text against the requested
            # type is what `raw.parse()` ends with, without first rebuilding the whole response
            # as SDK objects (milliseconds of CPU per call, five at once on the critical path).
            output = request.output_type.model_validate_json(text)
        except ValidationError as exc:
            raise LLMCallError(
                f"structured output did not match {request.output_type.__name__}: {_short(exc)}",
                retryable,
                usage=usage,
            ) from exc
        model = str(body.get("model", request.model))
        logger.debug(
            "llm response",
            step=request.step,
            model=model,
            client_request_id=request.client_request_id,
            response_id=body.get("id"),
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
        )
        return LLMResult(output=output, usage=usage, model=model)


def _output_text(body: dict[str, Any]) -> str | None:
    """The text of the first `output_text` content of a Responses API body."""
    for item in body.get("output") or []:
        if not isinstance(item, dict):
            continue
        for content in item.get("content") or []:
            if isinstance(content, dict) and content.get("type") == "output_text":
                text = content.get("text")
                return text if isinstance(text, str) else None
    return None


def _status_error(exc: openai.APIStatusError, model: str) -> LLMCallError:
    """Classify an HTTP error answer: retry it, fail the run, or wait for a configuration fix."""
    status = exc.status_code
    if status in _MISCONFIGURED_STATUS:
        # The provider's message is left out: for a bad key it quotes part of the key.
        code = _short(exc.code or exc.type or "no error code", 80)
        if _misconfigured_log.allow():
            logger.error(
                "LLM provider misconfigured: HTTP {} ({}) for model {}; runs wait for a fix",
                status,
                code,
                model,
                lifecycle_event="provider_misconfigured",
                status=status,
                model=model,
            )
        return LLMCallError(
            f"HTTP {status} from the LLM ({code}) for model {model}: "
            "the provider rejects the configured key, its access or the model",
            LLMErrorKind.MISCONFIGURED,
        )
    passing = status in _RETRYABLE_STATUS or status >= 500
    return LLMCallError(
        f"HTTP {status} from the LLM: {_short(exc.message)}",
        LLMErrorKind.RETRYABLE if passing else LLMErrorKind.PERMANENT,
        retry_after=retry_after_seconds(exc.response.headers),
    )


def _raise_for_unusable(body: dict[str, Any], usage: TokenUsage) -> None:
    """Refusals and incomplete responses are reported as such, not as parse errors."""
    for item in body.get("output") or []:
        if not isinstance(item, dict):
            continue
        for content in item.get("content") or []:
            if isinstance(content, dict) and content.get("type") == "refusal":
                reason = _short(content.get("refusal", ""))
                raise LLMCallError(
                    f"the model refused: {reason}", LLMErrorKind.PERMANENT, usage=usage
                )
    if body.get("status") == "incomplete":
        details = body.get("incomplete_details") or {}
        reason = details.get("reason", "unknown") if isinstance(details, dict) else "unknown"
        raise LLMCallError(
            f"incomplete response ({reason})",
            LLMErrorKind.PERMANENT if reason == "content_filter" else LLMErrorKind.RETRYABLE,
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
