"""Alembic builds exactly the tables the models describe, on SQLite and on PostgreSQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from app.store.db import alembic_config, head_revision
from app.store.tables import Base


async def schema_diff(url: str) -> list[object]:
    engine = create_async_engine(url)

    def diff(connection: Connection) -> list[object]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    def revision(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    try:
        async with engine.connect() as connection:
            assert await connection.run_sync(revision) == head_revision()
            return await connection.run_sync(diff)
    finally:
        await engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path}/migrated.db"
    command.upgrade(alembic_config(url), "head")
    return url


async def test_sqlite_schema_matches_models(sqlite_url: str) -> None:
    assert await schema_diff(sqlite_url) == []


async def test_postgresql_schema_matches_models(pg_url: str) -> None:
    assert await schema_diff(pg_url) == []


def test_downgrade_and_upgrade_again(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/roundtrip.db"
    command.upgrade(alembic_config(url), "head")
    command.downgrade(alembic_config(url), "base")
    command.upgrade(alembic_config(url), "head")


def test_runs_made_before_revisions_become_initial_runs(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/old.db"
    command.upgrade(alembic_config(url), "0003")
    old = sqlite3.connect(tmp_path / "old.db")
    with old:
        old.execute(
            "INSERT INTO runs (id, run_type, priority, status, input_idea, delivery_count, "
            "created_at, updated_at, queued_at) VALUES ('r1', 'full_review', 'normal', "
            "'completed', 'An idea.', 1, '2026-01-01', '2026-01-01', '2026-01-01')"
        )
    old.close()

    command.upgrade(alembic_config(url), "head")

    migrated = sqlite3.connect(tmp_path / "old.db")
    try:
        row = migrated.execute(
            "SELECT run_type, parent_run_id, schema_version, prompt_set_version FROM runs"
        ).fetchone()
    finally:
        migrated.close()
    assert row == ("initial", None, "1.0.0", "1.0.0")


def test_steps_recorded_before_prices_cost_nothing_or_unknown(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/priced.db"
    command.upgrade(alembic_config(url), "0004")
    old = sqlite3.connect(tmp_path / "priced.db")
    with old:
        old.execute(
            "INSERT INTO runs (id, run_type, priority, status, input_idea, delivery_count, "
            "created_at, updated_at, queued_at) VALUES ('r1', 'initial', 'normal', "
            "'completed', 'An idea.', 1, '2026-01-01', '2026-01-01', '2026-01-01')"
        )
        for order, (step, tokens) in enumerate((("expand", 150), ("aggregate_decision", 0))):
            old.execute(
                "INSERT INTO step_progress (run_id, step_name, step_order, status, attempts, "
                "input_tokens, output_tokens, total_tokens) VALUES "
                "('r1', ?, ?, 'completed', 1, ?, 0, ?)",
                (step, order, tokens, tokens),
            )
    old.close()

    command.upgrade(alembic_config(url), "head")

    migrated = sqlite3.connect(tmp_path / "priced.db")
    try:
        rows = migrated.execute(
            "SELECT step_name, model, cost_usd, spent_at FROM step_progress ORDER BY step_order"
        ).fetchall()
        deferred = migrated.execute("SELECT deferred_until FROM runs").fetchone()
    finally:
        migrated.close()
    # The model of an old call is not known, so neither is its price.
    assert rows == [("expand", None, None, None), ("aggregate_decision", None, 0.0, None)]
    assert deferred == (None,)
