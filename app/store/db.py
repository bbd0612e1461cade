"""Engine construction (embedded SQLite, PostgreSQL, Cloud SQL connector) and schema checks."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from loguru import logger
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from app.settings import Settings

ALEMBIC_INI = Path(__file__).resolve().parents[2] / "alembic.ini"


class CloudSQLConnector(Protocol):
    """The part of `google.cloud.sql.connector.Connector` the engine uses."""

    async def connect_async(
        self, instance_connection_string: str, driver: str, **kwargs: Any
    ) -> Any: ...

    async def close_async(self) -> None: ...


def build_engine(
    settings: Settings, connector: CloudSQLConnector | None = None, pooled: bool = True
) -> AsyncEngine:
    """The async engine for the configured database; `connector` is set for Cloud SQL.

    Without `pooled`, each connection is opened for its user and closed after (the run events'
    listener holds one for as long as it listens). With LOG_LEVEL=DEBUG every statement is
    logged, without its parameters (they hold ideas, proposals and reviews).
    """
    engine = _engine(settings, connector, pooled)
    if settings.log_level == "DEBUG":
        event.listen(engine.sync_engine, "before_cursor_execute", _log_statement)
    return engine


def _log_statement(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    logger.debug("sql: {}", " ".join(statement.split())[:1000])


def _engine(settings: Settings, connector: CloudSQLConnector | None, pooled: bool) -> AsyncEngine:
    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine

    pool: dict[str, Any] = {
        "pool_size": settings.db_pool_size,
        "max_overflow": settings.db_max_overflow,
        "pool_timeout": settings.db_pool_timeout_seconds,
        # No ping on every checkout (a round trip per transaction): a connection that died
        # fails its statement, SQLAlchemy invalidates the pool, and the delivery answers 503.
        "pool_pre_ping": False,
    }
    if not pooled:
        pool = {"poolclass": NullPool}
    bounds = connection_bounds(settings)
    if not settings.use_cloud_sql_connector:
        return create_async_engine(url, connect_args=bounds, **pool)

    if connector is None:
        raise ValueError("USE_CLOUD_SQL_CONNECTOR=true needs a Cloud SQL connector")
    instance = settings.db_instance_connection_name
    assert instance is not None  # Settings guarantees it with the connector on
    options: dict[str, Any] = {
        "user": settings.db_user,
        "db": settings.db_name,
        "ip_type": settings.db_ip_type,
        **bounds,
    }
    if settings.db_iam_auth:
        options["enable_iam_auth"] = True
    elif settings.db_password is not None:
        options["password"] = settings.db_password.get_secret_value()

    async def connect() -> Any:
        return await connector.connect_async(instance, "asyncpg", **options)

    return create_async_engine(url, async_creator=connect, **pool)


def connection_bounds(settings: Settings) -> dict[str, Any]:
    """asyncpg options that bound every database call, so a database that hangs instead of
    refusing cannot wedge a delivery: connect and command timeouts on the client; statement,
    lock and idle-in-transaction timeouts on the server (a session cut mid-transaction does not
    keep its row locks), and TCP keepalives so the server notices a client that vanished."""
    statement_ms = int(settings.db_statement_timeout_seconds * 1000)
    return {
        "timeout": settings.db_connect_timeout_seconds,
        # A little above the server's limit, so the server's own error usually wins.
        "command_timeout": settings.db_statement_timeout_seconds + 1.0,
        "server_settings": {
            "statement_timeout": str(statement_ms),
            "lock_timeout": str(statement_ms),
            "idle_in_transaction_session_timeout": str(statement_ms * 3),
            "tcp_keepalives_idle": "10",
            "tcp_keepalives_interval": "5",
            "tcp_keepalives_count": "3",
        },
    }


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


@dataclass(frozen=True)
class SchemaStatus:
    reachable: bool
    revision: str | None
    head: str | None

    @property
    def current(self) -> bool:
        return self.reachable and self.revision == self.head


class SchemaCheck:
    """Whether the database answers with its schema at the current migration.

    Re-checked on the request path, at most every `ttl` seconds while it is current and every
    `retry_ttl` seconds while it is not: an instance that started during a database blip serves
    as soon as the database is back, and an outage costs one probe per interval rather than one
    per request.
    """

    def __init__(
        self, engine: AsyncEngine, head: str | None, ttl: float, retry_ttl: float = 1.0
    ) -> None:
        self._engine = engine
        self._ttl = ttl
        self._retry_ttl = retry_ttl
        self._status = SchemaStatus(False, None, head)
        self._checked_at = -float("inf")
        self._lock = asyncio.Lock()

    async def status(self, fresh: bool = False) -> SchemaStatus:
        """The cached status, re-checked when older than `ttl` (or now with `fresh`)."""
        ttl = self._ttl if self._status.current else self._retry_ttl
        if not fresh and time.monotonic() - self._checked_at < ttl:
            return self._status
        if self._lock.locked() and not fresh:
            return self._status  # another request is checking; don't queue behind it
        async with self._lock:
            head = self._status.head
            try:
                status = SchemaStatus(True, await current_revision(self._engine), head)
            except Exception as exc:  # whatever the driver raises, the answer is: unreachable
                status = SchemaStatus(False, None, head)
                reason = type(exc).__name__
            else:
                reason = f"schema at {status.revision}, expected {head}"
            if status.current != self._status.current or self._checked_at < 0:
                if status.current:
                    logger.info("database reachable and schema current: serving")
                elif status.reachable:
                    logger.error(
                        "database schema is behind ({}): run `alembic upgrade head`; refusing work",
                        reason,
                    )
                else:
                    logger.error("database unreachable ({}); refusing work", reason)
            self._status = status
            self._checked_at = time.monotonic()
            return status
