"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from loguru import logger

from app.api.deps import ServicesDep
from app.api.errors import error_response
from app.store.db import current_revision

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up. Says nothing about configuration or dependencies."""
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(services: ServicesDep) -> dict[str, str] | JSONResponse:
    """The database answers and its schema is at the current migration."""
    try:
        revision = await current_revision(services.engine)
    except Exception as exc:  # whatever the driver raises, the answer is: not ready
        logger.warning("readiness: database unreachable: {}", type(exc).__name__)
        return error_response(503, "database_unavailable", "database unreachable")
    services.schema_current = revision == services.head_revision
    if not services.schema_current:
        return error_response(
            503,
            "schema_behind",
            "database schema is not at the current migration",
            {"database": revision, "expected": services.head_revision},
        )
    return {"status": "ready", "schema": str(revision)}
