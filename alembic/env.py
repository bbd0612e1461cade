"""Alembic environment: migrates the database the service's settings point at."""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from app.settings import get_settings
from app.store.db import build_engine, new_cloud_sql_connector
from app.store.tables import Base

config = context.config
if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    settings = get_settings()
    url = config.attributes.get("database_url")
    if url is not None:
        settings = settings.model_copy(
            update={"database_url": url, "use_cloud_sql_connector": False}
        )
    connector = new_cloud_sql_connector() if settings.use_cloud_sql_connector else None
    engine = build_engine(settings, connector)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_migrate)
    finally:
        await engine.dispose()
        if connector is not None:
            await connector.close_async()


connection = config.attributes.get("connection")
if connection is not None:
    _migrate(connection)
else:
    asyncio.run(_run_online())
