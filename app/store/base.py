"""What every repository shares: one short transaction per call, driver errors classified, and
the database's clock.

Driver errors are translated here, at the edge: a failure that may pass (connection lost,
timeout, resources exhausted, the server shutting down or starting, a cancelled statement, a
serialization failure or deadlock) becomes `StoreUnavailable`; nothing above imports the driver.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Executable, Float, Result, bindparam
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import FunctionElement

from app.errors import StoreUnavailable
from app.store.tables import UTCDateTime

if TYPE_CHECKING:
    from app.store.events import RunEvent

# SQLSTATE classes and codes after which the same statement may succeed later (PostgreSQL
# Appendix A): connection exception, insufficient resources, operator intervention (shutdown,
# starting up, statement cancelled), system error, and transaction rollback (serialization
# failure, deadlock); plus lock_not_available and idle_in_transaction_session_timeout, which
# the session timeouts raise.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "58", "40")
_TRANSIENT_SQLSTATES = frozenset({"55P03", "25P03"})


class db_time(FunctionElement[datetime]):
    """The database's current time plus `offset_seconds`: leases and staleness are judged on
    one clock, whatever the instances' own clocks say."""

    type = UTCDateTime()
    inherit_cache = True

    def __init__(self, offset_seconds: float = 0.0) -> None:
        super().__init__(
            bindparam("offset_seconds", float(offset_seconds), type_=Float(), unique=True)
        )


@compiles(db_time, "postgresql")
def _db_time_postgresql(element: db_time, compiler: SQLCompiler, **kw: Any) -> str:
    offset = compiler.process(element.clauses, **kw)
    return f"(clock_timestamp() + make_interval(secs => {offset}))"


@compiles(db_time, "sqlite")
def _db_time_sqlite(element: db_time, compiler: SQLCompiler, **kw: Any) -> str:
    offset = compiler.process(element.clauses, **kw)
    # The same text layout SQLAlchemy stores, so values compare as strings.
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%+.3f seconds', {offset}))"


def is_transient(exc: BaseException) -> bool:
    """True for driver and pool failures that may pass on a later try."""
    # OSError covers refused and reset connections and TimeoutError (asyncpg's command timeout).
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError | OSError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if isinstance(sqlstate, str):
            return sqlstate.startswith(_TRANSIENT_SQLSTATE_CLASSES) or (
                sqlstate in _TRANSIENT_SQLSTATES
            )
    return False


class Repository:
    """Base of the repositories: sessions from one engine, one transaction per call."""

    def __init__(
        self,
        engine: AsyncEngine,
        announce: Callable[[Sequence[RunEvent]], None] | None = None,
    ) -> None:
        """`announce` receives the run events a transaction added, once it committed."""
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._announce = announce

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncSession]:
        """One unit of work; failures that may pass become `StoreUnavailable`."""
        try:
            async with self._sessions.begin() as session:
                yield session
        except Exception as exc:
            if is_transient(exc):
                raise _unavailable(exc) from exc
            raise

    @asynccontextmanager
    async def _progress(self) -> AsyncIterator[tuple[AsyncConnection, list[RunEvent]]]:
        """One transaction of Core statements (the hot path's writes: no ORM session to build)
        and the run events it adds, announced once it committed."""
        events: list[RunEvent] = []
        try:
            async with self._engine.begin() as connection:
                yield connection, events
        except Exception as exc:
            if is_transient(exc):
                raise _unavailable(exc) from exc
            raise
        if events and self._announce is not None:
            self._announce(events)

    async def _insert(self, row: Any) -> int:
        """Add one ORM row in its own transaction; its new primary key."""
        async with self._transaction() as session:
            session.add(row)
            await session.flush()
            return int(row.id)

    async def _statement(
        self, statement: Executable, params: Mapping[str, Any] | None = None
    ) -> Result[Any]:
        """One statement on its own, in autocommit: a single statement is atomic by itself,
        and this saves the BEGIN and COMMIT round trips of a transaction (the hot path makes
        a dozen such writes per run). The result is buffered."""
        try:
            async with self._engine.connect() as connection:
                autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
                return await autocommit.execute(statement, params)
        except Exception as exc:
            if is_transient(exc):
                raise _unavailable(exc) from exc
            raise


def _unavailable(exc: BaseException) -> StoreUnavailable:
    return StoreUnavailable(f"database unavailable: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None)
    name = type(orig).__name__ if orig is not None else type(exc).__name__
    return f"{name} (SQLSTATE {sqlstate})" if sqlstate else name
