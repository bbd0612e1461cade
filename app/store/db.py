"""Engine construction (embedded SQLite, PostgreSQL, Cloud SQL connector) and schema checks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.settings import Settings

ALEMBIC_INI = Path(__file__).resolve().parents[2] / "alembic.ini"


class CloudSQLConnector(Protocol):
    """The part of `google.cloud.sql.connector.Connector` the engine uses."""

    async def connect_async(
        self, instance_connection_string: str, driver: str, **kwargs: Any
    ) -> Any: ...

    async def close_async(self) -> None: ...


def build_engine(settings: Settings, connector: CloudSQLConnector | None = None) -> AsyncEngine:
    """The async engine for the configured database; `connector` is set for Cloud SQL."""
    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine

    pool: dict[str, Any] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_timeout": settings.db_pool_timeout_seconds,
        "pool_pre_ping": True,
    }
    if not settings.use_cloud_sql_connector:
        return create_async_engine(url, **pool)

    if connector is None:
        raise ValueError("USE_CLOUD_SQL_CONNECTOR=true needs a Cloud SQL connector")
    instance = settings.db_instance_connection_name
    assert instance is not None  # Settings guarantees it with the connector on
    options: dict[str, Any] = {"user": settings.db_user, "db": settings.db_name}
    if settings.db_iam_auth:
        options["enable_iam_auth"] = True
    elif settings.db_password is not None:
        options["password"] = settings.db_password.get_secret_value()

    async def connect() -> Any:
        return await connector.connect_async(instance, "asyncpg", **options)

    return create_async_engine(url, async_creator=connect, **pool)


def new_cloud_sql_connector() -> CloudSQLConnector:
    """A connector with lazy refresh, which suits Cloud Run's throttled CPU between requests."""
    from google.cloud.sql.connector import Connector, RefreshStrategy

    connector: CloudSQLConnector = Connector(
        refresh_strategy=RefreshStrategy.LAZY, loop=asyncio.get_running_loop()
    )
    return connector


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL and a busy timeout let concurrent deliveries share the embedded database.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def alembic_config(url: str | None = None) -> Config:
    """Alembic configuration; `url` overrides the settings-derived database."""
    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(ALEMBIC_INI.parent / "alembic"))
    if url is not None:
        config.attributes["database_url"] = url
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def current_revision(engine: AsyncEngine) -> str | None:
    def read(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with engine.connect() as connection:
        return await connection.run_sync(read)


async def upgrade_to_head(engine: AsyncEngine) -> None:
    """Run the migrations on the engine's database (used for the embedded default)."""

    def upgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "head")

    async with engine.begin() as connection:
        await connection.run_sync(upgrade)
