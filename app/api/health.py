"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import ServicesDep
from app.api.errors import error_response
from app.api.schemas import ErrorBody

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up. Says nothing about configuration or dependencies."""
    return {"status": "ok"}


@router.get("/ready", response_model=None, responses={503: {"model": ErrorBody}})
async def ready(services: ServicesDep) -> dict[str, str] | JSONResponse:
    """The database answers and its schema is at the current migration."""
    status = await services.schema.status(fresh=True)
    if not status.reachable:
        return error_response(503, "database_unavailable", "database unreachable")
    if not status.current:
        return error_response(
            503,
            "schema_behind",
            "database schema is not at the current migration",
            {"database": status.revision, "expected": status.head},
        )
    return {"status": "ready", "schema": str(status.revision)}
