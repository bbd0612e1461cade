"""How the engine is built for each database mode; Cloud SQL through a fake connector object."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.pool import QueuePool

from app.settings import Settings
from app.store.db import build_engine, connection_bounds, current_revision, head_revision
from tests.conftest import PG_ADMIN_DSN


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


class FakeConnector:
    """Stands in for `google.cloud.sql.connector.Connector` (unreachable from here): it records
    what the engine asks for and hands back a real asyncpg connection to the test database."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.closed = False

    async def connect_async(
        self, instance_connection_string: str, driver: str, **kwargs: Any
    ) -> Any:
        self.calls.append((instance_connection_string, driver, kwargs))
        base = PG_ADMIN_DSN.rsplit("/", 1)[0]
        return await asyncpg.connect(f"{base}/{self.database}")

    async def close_async(self) -> None:
        self.closed = True


def database_name(pg_url: str) -> str:
    return pg_url.rsplit("/", 1)[1]


@pytest.mark.parametrize("iam", [True, False])
async def test_cloud_sql_connector_mode(pg_url: str, iam: bool) -> None:
    connector = FakeConnector(database_name(pg_url))
    config = settings(
        use_cloud_sql_connector=True,
        db_instance_connection_name="proj:europe-west1:consensus-db",
        db_user="receiver@proj.iam" if iam else "app",
        db_password=None if iam else "s3cret",
        db_name="consensus_engine",
        db_iam_auth=iam,
        db_pool_size=3,
        db_max_overflow=2,
    )
    engine = build_engine(config, connector)
    try:
        async with engine.connect() as connection:
            assert (await connection.execute(text("select 1"))).scalar() == 1
        assert await current_revision(engine) == head_revision()
        assert isinstance(engine.pool, QueuePool)
        assert engine.pool.size() == 3
    finally:
        await engine.dispose()

    instance, driver, options = connector.calls[0]
    assert (instance, driver) == ("proj:europe-west1:consensus-db", "asyncpg")
    expected: dict[str, Any] = {
        "user": config.db_user,
        "db": "consensus_engine",
        "ip_type": "public",  # DB_IP_TYPE's default
        **connection_bounds(config),
    }
    expected.update({"enable_iam_auth": True} if iam else {"password": "s3cret"})
    assert options == expected


def test_cloud_sql_mode_needs_a_connector() -> None:
    config = settings(use_cloud_sql_connector=True, db_instance_connection_name="p:r:i")
    with pytest.raises(ValueError, match="connector"):
        build_engine(config)


async def test_database_url_mode_uses_a_bounded_pool(pg_url: str) -> None:
    engine = build_engine(settings(database_url=pg_url, db_pool_size=4, db_max_overflow=1))
    try:
        assert engine.url.drivername == "postgresql+asyncpg"
        assert isinstance(engine.pool, QueuePool)
        assert engine.pool.size() == 4
        async with engine.connect() as connection:
            assert (await connection.execute(text("select 1"))).scalar() == 1
    finally:
        await engine.dispose()


async def test_every_database_session_is_bounded(pg_url: str) -> None:
    """Statement, lock and idle-in-transaction timeouts and keepalives on the server side."""
    engine = build_engine(settings(database_url=pg_url, db_statement_timeout_seconds=7))
    names = (
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "tcp_keepalives_idle",
    )
    try:
        async with engine.connect() as connection:
            shown = [(await connection.execute(text(f"SHOW {name}"))).scalar() for name in names]
    finally:
        await engine.dispose()
    assert shown == ["7s", "7s", "21s", "10"]


def test_db_fields_mode_builds_the_url() -> None:
    engine = build_engine(settings(db_host="127.0.0.1", db_port=5433, db_name="x", db_user="u"))
    assert engine.url.render_as_string(hide_password=False) == (
        "postgresql+asyncpg://u@127.0.0.1:5433/x"
    )


async def test_sqlite_mode_uses_wal(tmp_path: Any) -> None:
    engine = build_engine(settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/e.db"))
    try:
        async with engine.connect() as connection:
            mode = (await connection.execute(text("PRAGMA journal_mode"))).scalar()
        assert mode == "wal"
    finally:
        await engine.dispose()
