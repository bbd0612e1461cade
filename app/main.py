"""The FastAPI application: `create_app(settings)` wires every part; `app` is the default one."""

from __future__ import annotations

import asyncio
import contextvars
import os
import signal
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from loguru import logger
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import diff, health, push, runs, tasks
from app.api import events as events_api
from app.api.deps import Services
from app.api.errors import error_response, install_error_handlers, request_id_var
from app.auth import build_api_authenticator, build_authenticator, build_ui_authenticator
from app.cost import CostMeter, DailyBudget
from app.dead_letter import DeadLetterReceiver
from app.domain.llm import LLM
from app.domain.personas import validate_policy
from app.domain.pipeline import PipelineConfig
from app.domain.retry import RetryPolicy
from app.events import RunEvents
from app.llm.offline import OfflineProvider
from app.llm.openai_provider import OpenAIProvider, build_client
from app.logs import configure_logging, trace_context
from app.publish import InProcessPublisher, Outbox, Publisher, PubSubPublisher
from app.service import ExecutionLimits, PushReceiver, Runner
from app.settings import Settings, get_settings
from app.store.db import (
    SchemaCheck,
    build_engine,
    head_revision,
    new_cloud_sql_connector,
    upgrade_to_head,
)
from app.store.events import EventStore
from app.store.recovery import RecoveryStore
from app.store.runs import RunStore
from app.store.spend import SpendStore
from app.sweep import Sweeper, queued
from app.tracing import Tracing
from app.ui import install_ui

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

# How long a cached readiness answer stands on the request path.
SCHEMA_CHECK_TTL_SECONDS = 5.0
SHUTDOWN_DB_CLOSE_SECONDS = 2.0


def create_app(settings: Settings, span_exporter: SpanExporter | None = None) -> FastAPI:
    """The service for `settings`; everything with I/O is built in the lifespan.

    `span_exporter` replaces Cloud Trace as where spans go when TRACING_ENABLED (tests).
    """
    tracing = Tracing(settings, span_exporter)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(
            settings.env == "production", settings.log_level, settings.pubsub_project_id
        )
        validate_policy()
        connector = new_cloud_sql_connector() if settings.use_cloud_sql_connector else None
        engine = build_engine(settings, connector)
        if settings.auto_migrate:
            await upgrade_to_head(engine)
        tracing.start(engine)
        events = RunEvents(
            EventStore(engine),
            # PostgreSQL: LISTEN on a connection of its own while a stream is open.
            None if settings.is_sqlite else build_engine(settings, connector, pooled=False),
        )
        store = RunStore(engine, announce=events.announce)
        recovery = RecoveryStore(engine, announce=events.announce)
        llm = _build_llm(settings, tracing)
        runner = Runner(
            store,
            tracing.traced(llm),
            pipeline_config(settings),
            ExecutionLimits(
                lease_seconds=settings.run_lease_seconds,
                push_deadline_seconds=settings.effective_push_deadline_seconds,
                job_timeout_seconds=settings.worker_job_timeout_seconds,
                max_concurrent_runs=settings.worker_max_concurrency,
            ),
            tracer=tracing.tracer,
            instance_id=f"{socket.gethostname()}:{os.getpid()}",
            meter=CostMeter(settings.llm_prices),
            budget=(
                DailyBudget(SpendStore(engine), settings.daily_budget_usd)
                if settings.daily_budget_usd is not None
                else None
            ),
        )
        receiver = PushReceiver(store, runner)
        publisher: Publisher
        if settings.pubsub_project_id:
            publisher = PubSubPublisher(
                settings.pubsub_project_id,
                settings.pubsub_topic,
                settings.effective_pubsub_high_priority_topic,
                settings.pubsub_emulator_host,
                tracer=tracing.tracer,
            )
        else:
            publisher = InProcessPublisher(
                receiver.handle,
                max_attempts=settings.max_delivery_attempts,
                initial_backoff=max(settings.retry_initial_backoff_seconds, 0.1),
                max_in_flight=settings.worker_max_concurrency,
                tracer=tracing.tracer,
            )
        outbox = Outbox(recovery, publisher)
        sweeper = Sweeper(
            recovery,
            outbox,
            settings.run_stale_seconds,
            settings.worker_job_timeout_seconds,
            runs=store,
        )
        services = Services(
            settings=settings,
            engine=engine,
            store=store,
            receiver=receiver,
            dead_letters=DeadLetterReceiver(
                store, recovery, outbox, receiver, settings.worker_job_timeout_seconds
            ),
            outbox=outbox,
            sweeper=sweeper,
            authenticator=build_authenticator(settings),
            api_authenticator=build_api_authenticator(settings),
            ui_authenticator=build_ui_authenticator(settings),
            schema=SchemaCheck(engine, head_revision(), SCHEMA_CHECK_TTL_SECONDS),
            events=events,
        )
        if (await services.schema.status()).current and isinstance(publisher, InProcessPublisher):
            # No queue redelivers on the embedded default: pick up what a previous process left.
            for run in await recovery.unfinished_runs(limit=1000):
                await publisher.publish(queued(run))
        # The in-process timer is off (0) on Cloud Run, where CPU is throttled outside requests
        # and Cloud Scheduler's POST /tasks/sweep triggers every round instead.
        sweeping = (
            asyncio.create_task(sweeper.run_forever(settings.sweep_interval_seconds))
            if settings.sweep_interval_seconds > 0
            else None
        )
        app.state.services = services

        def begin_shutdown() -> None:
            runner.begin_shutdown()
            events.close_streams()

        restore_signals = _on_shutdown_signal(begin_shutdown)
        logger.info(
            "service started (llm={}, database={}, push_auth={}, api_auth={})",
            settings.effective_llm_provider,
            engine.url.get_backend_name(),
            settings.effective_push_auth,
            settings.effective_api_auth,
            lifecycle_event="worker.started",
        )
        try:
            yield
        finally:
            restore_signals()
            begin_shutdown()
            if sweeping is not None:
                sweeping.cancel()
                await asyncio.gather(sweeping, return_exceptions=True)
            await publisher.aclose()
            await services.authenticator.aclose()
            await services.api_authenticator.aclose()
            await services.ui_authenticator.aclose()
            if isinstance(llm, OpenAIProvider):
                await llm.aclose()
            try:
                # Closing connections to a database that hangs must not hold the exit past
                # Cloud Run's 10 s; the server drops what is left when the process ends.
                async with asyncio.timeout(SHUTDOWN_DB_CLOSE_SECONDS):
                    await events.aclose()
                    await engine.dispose()
                    if connector is not None:
                        await connector.close_async()
            except TimeoutError:
                logger.warning("database connections not closed in time; leaving them")
            await tracing.shutdown()
            logger.info("service stopped")

    app = FastAPI(
        title="consensus-engine",
        summary="An LLM consensus review pipeline behind Google Cloud Pub/Sub push.",
        version="0.1.0",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(push.router)
    app.include_router(runs.router)
    app.include_router(diff.router)
    app.include_router(events_api.router)
    app.include_router(tasks.router)
    if settings.effective_ui_enabled:
        install_ui(app)
    app.add_middleware(RequestContextMiddleware)
    if settings.cors_origins:
        # Outermost, so preflights are answered before any route or guard, and every answer
        # (errors included) carries the CORS headers a browser needs to read it.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID"],
            max_age=600,
        )
    tracing.instrument_app(app)
    return app


def pipeline_config(settings: Settings) -> PipelineConfig:
    """The domain's view of the settings."""
    return PipelineConfig(
        expand_model=settings.effective_expand_model,
        expand_temperature=settings.expand_temperature,
        review_model=settings.effective_review_model,
        review_temperature=settings.review_temperature,
        step_timeout=settings.worker_step_timeout_seconds,
        retry=RetryPolicy(
            max_retries=settings.max_retries_per_persona,
            initial_backoff=settings.retry_initial_backoff_seconds,
            multiplier=settings.retry_backoff_multiplier,
            max_backoff=settings.retry_max_backoff_seconds,
        ),
    )


def _build_llm(settings: Settings, tracing: Tracing) -> LLM:
    if settings.effective_llm_provider == "offline":
        return OfflineProvider()
    assert settings.openai_api_key is not None  # Settings guarantees it for openai
    client = build_client(
        settings.openai_api_key.get_secret_value(),
        settings.openai_base_url,
        settings.worker_step_timeout_seconds,
        tracing.sdk_provider,
    )
    return OpenAIProvider(client, settings.llm_max_concurrency)


def _on_shutdown_signal(callback: Callable[[], None]) -> Callable[[], None]:
    """Run `callback` on SIGTERM/SIGINT before the server's own handler (uvicorn's graceful exit).

    The server stops accepting connections and waits for requests in flight; the callback makes
    those requests release their runs and answer 503 at once instead of running to completion.
    Returns a function that puts the previous handlers back.
    """
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals can only be handled in the main thread

    def handler(signum: int, frame: FrameType | None) -> None:
        # An empty context: the signal may interrupt a request whose log context (its run_id)
        # would otherwise stick to the shutdown's log lines.
        loop.call_soon_threadsafe(callback, context=contextvars.Context())
        chained = previous[signum]
        if callable(chained):
            chained(signum, frame)

    for sig in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(sig)
        if callable(current):  # only chain onto a server's handler, never replace the default
            previous[sig] = current
            signal.signal(sig, handler)

    def restore() -> None:
        for sig, chained in previous.items():
            signal.signal(sig, chained)

    return restore


class RequestContextMiddleware:
    """`X-Request-ID` on every response; request and trace ids on every log line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        request_token = request_id_var.set(request_id)
        trace_token = trace_context.set(headers.get("x-cloud-trace-context"))

        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", [])
                message["headers"].append((b"x-request-id", request_id.encode("latin-1")))
            await send(message)

        try:
            with logger.contextualize(request_id=request_id):
                try:
                    await self.app(scope, receive, send_with_id)
                except Exception:
                    # Answered here, inside the request context, so even a 500 has the error
                    # shape and its X-Request-ID.
                    logger.exception("unhandled error")
                    if started:
                        raise
                    response = error_response(500, "internal_error", "internal server error")
                    await response(scope, receive, send_with_id)
        finally:
            request_id_var.reset(request_token)
            trace_context.reset(trace_token)


app: FastAPI  # built on first access by __getattr__ below


def __getattr__(name: str) -> Any:
    # `uvicorn app.main:app` builds the default app on first access, not at import, so
    # tests and tools can import this module without reading the environment.
    if name == "app":
        global app
        app = create_app(get_settings())
        return app
    raise AttributeError(name)
