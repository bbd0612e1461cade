"""Traces: OpenTelemetry spans exported to Cloud Trace when TRACING_ENABLED is set.

A job is one trace: `POST /v1/full-review` -> `publish <topic>` -> (Pub/Sub) -> `POST /pubsub/push`
-> `claim` -> a span per step -> a span per LLM attempt -> its HTTP call, with every database
call of each under it. The publisher puts its span's context in the message attributes
(`googclient_traceparent`, the attribute Google's Pub/Sub client libraries use) and the push
delivery's server span continues that trace, as the publish span's child: the run's work then
reads as one tree from the request that submitted it. Pub/Sub's redeliveries of one message are
sibling subtrees of the same publish span; the request as Cloud Run's front end traced it is
linked from the delivery's server span.

Off (the default), nothing here runs on a request: no middleware, no database or HTTP hooks, and
the service's own spans come from OpenTelemetry's no-op tracer.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, contextmanager
from contextvars import Token
from typing import TYPE_CHECKING, Any

from loguru import logger
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.domain.llm import LLM, LLMCallError, LLMRequest, LLMResult, T
from app.push.envelope import TRACE_ATTRIBUTE_PREFIX, envelope_attributes, trace_carrier
from app.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler
    from sqlalchemy.ext.asyncio import AsyncEngine

# The routes Pub/Sub pushes to: their server span continues the publisher's trace, and their
# answer waits for the delivery's spans to be exported.
PUSH_PATHS = frozenset({"/pubsub/push", "/pubsub/dead-letter"})
# Probes, not work: no spans.
UNTRACED_URLS = "/health$,/ready$"
# How long a push answer may wait for its spans to be exported (Cloud Trace usually takes tens
# of milliseconds); past it the answer goes and the spans follow with the next export.
PUSH_FLUSH_SECONDS = 2.0
# The flush and shutdown at exit stay well inside the 10 s Cloud Run gives after SIGTERM.
SHUTDOWN_FLUSH_SECONDS = 3.0
SERVICE_NAME = "consensus-engine"

_PROPAGATOR = TraceContextTextMapPropagator()
# Where the push middleware leaves the trace headers the request arrived with.
_INCOMING_SCOPE_KEY = "consensus_engine.incoming_trace_headers"
_TRACE_HEADERS = (b"traceparent", b"tracestate")


class Tracing:
    """The app's tracer provider and what it instruments; when off, a no-op tracer only.

    `create_app` calls `instrument_app` (the middleware stack is built before the lifespan
    runs); the lifespan calls `start` with the engine, then `shutdown`, which flushes.
    `exporter` replaces Cloud Trace (tests pass an in-memory one).
    """

    def __init__(self, settings: Settings, exporter: SpanExporter | None = None) -> None:
        self.enabled = settings.tracing_enabled
        self._settings = settings
        self._exporter = exporter
        self._sdk: TracerProvider | None = None
        self._engine_instrumented = False
        if self.enabled:
            from opentelemetry.sdk.trace import TracerProvider

            self._sdk = TracerProvider(
                sampler=_sampler(settings.tracing_sample_ratio),
                resource=_resource(),
                shutdown_on_exit=False,  # the lifespan shuts it down, bounded
            )
        self.provider: trace.TracerProvider = self._sdk or trace.NoOpTracerProvider()
        self.tracer: trace.Tracer = self.provider.get_tracer(SERVICE_NAME)
        self._flusher = _Flusher(self._force_flush, PUSH_FLUSH_SECONDS)

    @property
    def sdk_provider(self) -> TracerProvider | None:
        """The SDK provider when tracing is on, for the instrumentations; None when off."""
        return self._sdk

    def instrument_app(self, app: FastAPI) -> None:
        """A server span per request; push deliveries continue their publisher's trace."""
        if self._sdk is None:
            return
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=self._sdk,
            excluded_urls=UNTRACED_URLS,
            # One span per request, not one per ASGI message sent or received.
            exclude_spans=["receive", "send"],
            server_request_hook=_link_incoming_request,
        )
        # Outside the instrumentation's middleware, which starts the server span from the
        # request headers: the push body must be read before that span starts.
        build_instrumented = app.build_middleware_stack
        limit = self._settings.push_max_body_bytes

        def build_middleware_stack() -> ASGIApp:
            return PushTracing(build_instrumented(), self._flusher.flush, limit)

        app.build_middleware_stack = build_middleware_stack  # type: ignore[method-assign]

    def start(self, engine: AsyncEngine) -> None:
        """Start exporting, and trace the database calls made through `engine`."""
        if self._sdk is None:
            return
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporter = self._exporter or _cloud_trace_exporter(self._settings.pubsub_project_id)
        self._sdk.add_span_processor(BatchSpanProcessor(exporter))
        # Process-wide hooks (one app per process in production); undone by `shutdown`. The
        # instrumentation declares SQLAlchemy < 2.1 (a bound set before 2.1 existed); the events
        # it hooks are unchanged in 2.1, and tests/test_tracing.py checks its spans on ours.
        SQLAlchemyInstrumentor().instrument(
            engine=engine.sync_engine, tracer_provider=self._sdk, skip_dep_check=True
        )
        self._engine_instrumented = True
        logger.info(
            "tracing on: {} of traces kept, exported to {}",
            f"{self._settings.tracing_sample_ratio:.0%}",
            type(exporter).__name__,
        )

    def traced(self, llm: LLM) -> LLM:
        """`llm` with a span per call attempt when tracing is on."""
        return llm if self._sdk is None else TracedLLM(llm, self.tracer)

    async def flush(self) -> None:
        """Export the spans ended so far (bounded); shared by callers arriving meanwhile."""
        if self._sdk is not None:
            await self._flusher.flush()

    async def shutdown(self) -> None:
        """Undo the hooks, export what is left and stop, within SHUTDOWN_FLUSH_SECONDS."""
        if self._sdk is None:
            return
        if self._engine_instrumented:
            from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

            SQLAlchemyInstrumentor().uninstrument()
            self._engine_instrumented = False
        sdk = self._sdk
        if not await _in_daemon_thread(sdk.shutdown, SHUTDOWN_FLUSH_SECONDS):
            logger.warning("spans not exported within {}s at shutdown", SHUTDOWN_FLUSH_SECONDS)

    def _force_flush(self, timeout_seconds: float) -> bool:
        assert self._sdk is not None
        return self._sdk.force_flush(int(timeout_seconds * 1000))


def _sampler(ratio: float) -> Sampler:
    """Keep `ratio` of traces, decided from the trace id.

    A parent that was sampled keeps its children. A remote parent marked "not sampled" does not
    veto ours (Cloud Run's front end samples few of the requests it forwards): the same trace-id
    rule decides, so the publish and every delivery of one job, on any instance, decide alike.
    """
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    by_trace_id = TraceIdRatioBased(ratio)
    return ParentBased(root=by_trace_id, remote_parent_not_sampled=by_trace_id)


def _resource() -> Any:
    """Who emits the spans: the Cloud Run service and revision when there (K_SERVICE,
    K_REVISION); OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME are honoured too."""
    from opentelemetry.sdk.resources import Resource

    attributes: dict[str, str] = {"service.name": os.environ.get("K_SERVICE", SERVICE_NAME)}
    if "K_SERVICE" in os.environ:
        attributes.update(
            {
                "cloud.provider": "gcp",
                "cloud.platform": "gcp_cloud_run",
                "faas.name": os.environ["K_SERVICE"],
                "faas.version": os.environ.get("K_REVISION", ""),
            }
        )
    return Resource.create(attributes)


def _cloud_trace_exporter(project_id: str | None) -> SpanExporter:
    """Cloud Trace's exporter (opentelemetry-exporter-gcp-trace, the Trace API v2).

    Its maintainers now deprecate it for OpenTelemetry's OTLP exporter sent to the Telemetry
    API (telemetry.googleapis.com, resource attribute gcp.project_id); moving there replaces
    only this function.
    """
    from google.auth.exceptions import DefaultCredentialsError
    from opentelemetry.exporter.cloud_trace import CloudTraceSpanExporter

    try:
        # Without a project, the exporter takes the credentials' own (the service's on Cloud
        # Run, which needs roles/cloudtrace.agent).
        exporter: SpanExporter = CloudTraceSpanExporter(project_id=project_id)  # type: ignore[no-untyped-call]
    except DefaultCredentialsError as exc:
        raise RuntimeError(
            "TRACING_ENABLED=true exports to Cloud Trace, which needs Google credentials "
            "(on Cloud Run the service's account; elsewhere `gcloud auth application-default "
            f"login` or GOOGLE_APPLICATION_CREDENTIALS): {exc}"
        ) from exc
    return exporter


# --- propagation through Pub/Sub message attributes -------------------------------------------


def message_trace_attributes() -> dict[str, str]:
    """The current span's context as message attributes (`googclient_traceparent`, ...).

    Empty when no span is current (tracing off): the message is then what it always was.
    """
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return {TRACE_ATTRIBUTE_PREFIX + key: value for key, value in carrier.items()}


def message_context(attributes: Mapping[str, str]) -> Context:
    """The publisher's context from a message's attributes; an empty context when none."""
    return _PROPAGATOR.extract(trace_carrier(attributes))


@contextmanager
def publishing(
    tracer: trace.Tracer, destination: str, run_id: str
) -> Iterator[tuple[trace.Span, dict[str, str]]]:
    """A PRODUCER span around one publish, and the attributes that carry it in the message."""
    with tracer.start_as_current_span(
        f"publish {destination}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "gcp_pubsub",
            "messaging.operation.type": "send",
            "messaging.destination.name": destination,
            "run_id": run_id,
        },
    ) as span:
        yield span, message_trace_attributes()


@contextmanager
def delivering(tracer: trace.Tracer, attributes: Mapping[str, str], name: str) -> Iterator[None]:
    """A CONSUMER span around a delivery made without HTTP (the in-process queue), the
    publish span's child: the delivery's spans join the publisher's trace."""
    with tracer.start_as_current_span(
        name,
        context=message_context(attributes),
        kind=SpanKind.CONSUMER,
        attributes={"messaging.system": "in_process", "messaging.operation.type": "process"},
    ):
        yield


# --- push deliveries over HTTP -----------------------------------------------------------------


class PushTracing:
    """Outermost middleware on the push routes, when tracing is on.

    1. The delivery's server span continues the publisher's trace: the trace context in the
       envelope's message attributes replaces the request's `traceparent` (Cloud Run's own
       request trace), which stays linked from the server span. The body is read here for it,
       at most PUSH_MAX_BODY_BYTES (a larger one passes on untouched for the route's 413), and
       handed on unchanged.
    2. The answer waits until the delivery's spans, the server span included, are exported
       (bounded by PUSH_FLUSH_SECONDS): once Cloud Run has the answer it may throttle the
       instance's CPU to almost nothing, and the exporter's background thread with it, until
       the next request; spans left in the queue would reach Cloud Trace minutes late, or be
       lost with an instance that crashes. The whole answer is held, its status line too: a
       204 is complete for the client as soon as its headers are out.
    """

    def __init__(self, app: ASGIApp, flush: Callable[[], Awaitable[None]], max_body: int) -> None:
        self.app = app
        self._flush = flush
        self._max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in PUSH_PATHS:
            await self.app(scope, receive, send)
            return
        received, body = await _read_body(receive, self._max_body)
        if body is not None:
            scope = _continue_publisher_trace(scope, body)
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        try:
            await self.app(scope, _replay(received, receive), hold)
        except Exception:
            for message in held:  # the error answer the app made, if any, as it would go
                await send(message)
            raise
        await self._flush()
        for message in held:
            await send(message)


async def _read_body(receive: Receive, limit: int) -> tuple[list[Message], bytes | None]:
    """The request's messages as received, and its body unless it is over `limit` bytes."""
    received: list[Message] = []
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        received.append(message)
        if message["type"] != "http.request":
            return received, None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return received, None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return received, b"".join(chunks)


def _replay(received: list[Message], receive: Receive) -> Receive:
    pending = deque(received)

    async def replayed() -> Message:
        return pending.popleft() if pending else await receive()

    return replayed


def _continue_publisher_trace(scope: Scope, body: bytes) -> Scope:
    """`scope` with the trace headers the message carries, when it carries a valid context."""
    carrier = trace_carrier(envelope_attributes(body))
    span_context = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
    if not span_context.is_valid:
        return scope
    headers = [(k, v) for k, v in scope["headers"] if k not in _TRACE_HEADERS]
    headers.append((b"traceparent", carrier["traceparent"].encode("ascii")))
    state = carrier.get("tracestate")
    if state and state.isascii():
        headers.append((b"tracestate", state.encode("ascii")))
    incoming = {
        k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in _TRACE_HEADERS
    }
    return {**scope, "headers": headers, _INCOMING_SCOPE_KEY: incoming}


def _link_incoming_request(span: trace.Span, scope: dict[str, Any]) -> None:
    """The server span links the trace the request arrived with (Cloud Run's request span)."""
    incoming = scope.get(_INCOMING_SCOPE_KEY)
    if not incoming:
        return
    linked = trace.get_current_span(_PROPAGATOR.extract(incoming)).get_span_context()
    if linked.is_valid:
        span.add_link(linked, {"link.reason": "the push request as it reached the service"})


class _Flusher:
    """Flushes the provider for push answers, one flush at a time in a thread of its own.

    A caller is covered by any flush that starts after it asked; callers arriving while a
    flush runs share the next one, so a burst of answers costs two exports, not one each.
    """

    def __init__(self, flush: Callable[[float], bool], bound_seconds: float) -> None:
        self._flush = flush
        self._bound = bound_seconds
        self._lock = asyncio.Lock()
        self._started = 0
        self._finished = 0

    async def flush(self) -> None:
        wanted = self._started + 1
        async with self._lock:
            if self._finished >= wanted:
                return
            self._started += 1
            number = self._started
            try:
                await _in_daemon_thread(lambda: self._flush(self._bound), self._bound)
            finally:
                # Bounded, not complete: spans a slow export left behind go with the next one.
                self._finished = number


async def _in_daemon_thread(call: Callable[[], object], bound: float) -> bool:
    """Run blocking `call` in a daemon thread; False when it did not finish within `bound`
    seconds.

    Not the default executor: an exporter that hangs must hold neither its workers (the
    Pub/Sub publisher uses them) nor the process's exit.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def finish() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            call()
        except Exception as exc:  # the exporter logs its own errors; this is a last resort
            logger.warning("span export failed: {!r}", exc)
        finally:
            if not loop.is_closed():
                loop.call_soon_threadsafe(finish)

    threading.Thread(target=run, name="span-flush", daemon=True).start()
    try:
        await asyncio.wait_for(asyncio.shield(done), bound)
    except TimeoutError:
        return False
    return True


# --- a run's delivery: the claim and the steps -------------------------------------------------


class DeliverySpans:
    """The spans of one delivery of a run, for the service (`Runner`, `_StoreProgress`).

    `claim` covers the delivery's claim on the run: the claim statement, then the work under
    the lease, until it is given back. Under it, a span per step, from its first attempt to its
    completion or failure (attempts as events; the LLM attempts' spans are its children). The
    pipeline reports a step through callbacks (`Progress`), so a step's span is made current in
    the task that runs the step from `step_started` until it ends there; a step the delivery
    abandoned (deadline, lease lost, shutdown) is ended, marked unfinished, with the claim.
    """

    def __init__(self, tracer: trace.Tracer, run_id: str) -> None:
        self._tracer = tracer
        self._run_id = run_id
        self._steps: dict[str, tuple[trace.Span, Token[Context]]] = {}

    @contextmanager
    def claim(self, delivery_attempt: int | None) -> Iterator[trace.Span]:
        attributes: dict[str, str | int] = {"run_id": self._run_id}
        if delivery_attempt is not None:
            attributes["delivery_attempt"] = delivery_attempt
        with self._tracer.start_as_current_span("claim", attributes=attributes) as span:
            try:
                yield span
            finally:
                for step in list(self._steps):
                    self._end(step, "step unfinished when the delivery ended", detach=False)

    def step_started(self, step: str, reused_from: str | None = None) -> None:
        """Before the step's attempt is recorded: opens its span, unless an earlier attempt
        did."""
        if step in self._steps:
            return
        attributes = {"run_id": self._run_id, "step": step}
        if reused_from is not None:
            attributes["reused_from_run_id"] = reused_from
        span = self._tracer.start_span(f"step {step}", attributes=attributes)
        token = otel_context.attach(trace.set_span_in_context(span))
        self._steps[step] = (span, token)

    def attempt(self, step: str, attempt: int) -> None:
        if step in self._steps:
            self._steps[step][0].set_attribute("attempts", attempt)

    def attempt_failed(self, step: str, error: str) -> None:
        if step in self._steps:
            self._steps[step][0].add_event("attempt failed", {"error": error})

    def step_ended(self, step: str, error: str | None = None) -> None:
        """After the step's completion or failure is recorded."""
        if step in self._steps:
            self._end(step, error, detach=True)

    def _end(self, step: str, error: str | None, detach: bool) -> None:
        span, token = self._steps.pop(step)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()
        if detach:
            otel_context.detach(token)


# --- LLM attempts ------------------------------------------------------------------------------


class TracedLLM:
    """The pipeline's LLM with a CLIENT span per call attempt: run id, step, attempt, model and
    tokens as attributes (OpenTelemetry's gen_ai names for model and tokens). The HTTP call the
    openai SDK makes is its child (the httpx2 instrumentation on the SDK's client)."""

    def __init__(self, llm: LLM, tracer: trace.Tracer) -> None:
        self._llm = llm
        self._tracer = tracer

    def slot(self) -> AbstractAsyncContextManager[None]:
        return self._llm.slot()

    async def generate(self, request: LLMRequest[T]) -> LLMResult[T]:
        # client_request_id is `<run_id>/<step>/<attempt>` (LLMRequest).
        parts = request.client_request_id.split("/")
        run_id, attempt = parts[0], parts[-1] if len(parts) == 3 else ""
        with self._tracer.start_as_current_span(
            f"chat {request.model}",
            kind=SpanKind.CLIENT,
            attributes={
                "run_id": run_id,
                "step": request.step,
                "attempt": int(attempt) if attempt.isdigit() else 0,
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": request.model,
                "gen_ai.request.temperature": request.temperature,
            },
            # Status and error are set below, from the kind of failure.
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                result = await self._llm.generate(request)
            except LLMCallError as exc:
                _usage(span, exc.usage.input_tokens, exc.usage.output_tokens)
                span.set_attribute("error.type", exc.kind.value)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                raise
            except BaseException as exc:
                # The step timeout cancels the call (CancelledError), or a bug.
                span.set_attribute("error.type", type(exc).__name__)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise
            span.set_attribute("gen_ai.response.model", result.model)
            _usage(span, result.usage.input_tokens, result.usage.output_tokens)
            return result


def _usage(span: trace.Span, input_tokens: int, output_tokens: int) -> None:
    span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
