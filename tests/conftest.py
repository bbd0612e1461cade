"""Shared fixtures: a fresh PostgreSQL database per session, the fake OpenAI server, the app."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
import pytest
from alembic import command
from fastapi import FastAPI
from sqlalchemy import update
from sqlalchemy.ext.asyncio import create_async_engine

from app.api.deps import Services
from app.main import create_app
from app.settings import Settings
from app.store.db import alembic_config, build_engine
from app.store.runs import RunStore
from app.store.tables import Run
from tests.fakes.openai_server import FakeOpenAI
from tests.procs import AppProcess

PG_ADMIN_DSN = os.environ.get("TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session, dropped afterwards."""
    name = f"ce_test_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    url = f"{base}/{name}"
    command.upgrade(alembic_config(url), "head")
    try:
        yield url
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def llm(fake_openai: FakeOpenAI) -> FakeOpenAI:
    """The fake OpenAI server, reset for this test."""
    fake_openai.reset()
    return fake_openai


@pytest.fixture
def make_settings(pg_url: str, fake_openai: FakeOpenAI) -> Callable[..., Settings]:
    """Settings for PostgreSQL and the fake LLM, with fast retries; override any field."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "env": "testing",
            "database_url": pg_url,
            "llm_provider": "openai",
            "openai_api_key": "sk-test",
            "openai_base_url": fake_openai.url,
            "retry_initial_backoff_seconds": 0.01,
            "retry_max_backoff_seconds": 1.0,
            "push_auth": "none",
            "log_level": "WARNING",
            # Tests deliver by hand; the relay only runs where a test asks for it.
            "sweep_interval_seconds": 3600,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return build


@asynccontextmanager
async def running_app(
    settings: Settings, clean: bool = True
) -> AsyncIterator[tuple[FastAPI, httpx2.AsyncClient]]:
    """The app with its lifespan running (on emptied tables unless `clean` is False)."""
    if clean:
        # Emptied before start-up, so nothing a previous test left is picked up by the app.
        engine = build_engine(settings)
        try:
            await RunStore(engine).delete_all()
        finally:
            await engine.dispose()
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(
            transport=transport, base_url="http://testserver", timeout=60
        ) as client:
            yield app, client


def services_of(app: FastAPI) -> Services:
    services: Services = app.state.services
    return services


async def queued_an_hour_ago(app: FastAPI, run: Run) -> None:
    """Move the run's queued_at an hour back: past a short job timeout, it is stuck."""
    async with services_of(app).engine.begin() as connection:
        await connection.execute(
            update(Run).where(Run.id == run.id).values(queued_at=run.queued_at - timedelta(hours=1))
        )


@pytest.fixture
async def app_client(
    make_settings: Callable[..., Settings], llm: FakeOpenAI
) -> AsyncIterator[tuple[FastAPI, httpx2.AsyncClient]]:
    """The app on a clean PostgreSQL database with the fake LLM."""
    async with running_app(make_settings()) as (app, client):
        yield app, client


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[RunStore]:
    """A run store on the emptied test database, for tests that drive app processes."""
    engine = create_async_engine(pg_url)
    store = RunStore(engine)
    await store.delete_all()
    try:
        yield store
    finally:
        await engine.dispose()


StartApp = Callable[..., AppProcess]


@pytest.fixture
def start_app(pg_url: str, llm: FakeOpenAI, tmp_path: Path) -> Iterator[StartApp]:
    """Start `uvicorn app.main:app` processes (env overrides as keywords); all stopped after."""
    started: list[AppProcess] = []
    base = {
        "ENV": "testing",
        "DATABASE_URL": pg_url,
        "LLM_PROVIDER": "openai",
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": llm.url,
        "PUSH_AUTH": "none",
        # Pub/Sub mode: nothing is delivered in-process behind the tests' backs. The emulator
        # address is a closed port unless a test passes a running emulator's.
        "PUBSUB_PROJECT_ID": "test-project",
        "PUBSUB_EMULATOR_HOST": "127.0.0.1:9",
        "SWEEP_INTERVAL_SECONDS": "3600",
        "RUN_LEASE_SECONDS": "2",
        "RETRY_INITIAL_BACKOFF_SECONDS": "0.01",
        "LOG_LEVEL": "INFO",
    }

    def start(**env: str) -> AppProcess:
        log = tmp_path / f"app-{len(started)}.log"
        process = AppProcess({**base, **env}, log)
        started.append(process)
        return process.start()

    try:
        yield start
    finally:
        for process in started:
            process.stop()
