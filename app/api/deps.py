"""What routes receive: the services built in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from app.api.errors import ApiError
from app.auth import Authenticator, AuthError
from app.dead_letter import DeadLetterReceiver
from app.events import RunEvents
from app.publish import Outbox
from app.service import PushReceiver
from app.settings import Settings
from app.store.db import SchemaCheck
from app.store.runs import RunStore
from app.sweep import Sweeper


@dataclass
class Services:
    settings: Settings
    engine: AsyncEngine
    store: RunStore
    receiver: PushReceiver
    dead_letters: DeadLetterReceiver
    outbox: Outbox
    sweeper: Sweeper
    authenticator: Authenticator
    api_authenticator: Authenticator
    # The run viewer's pages and their event stream (UI_AUTH).
    ui_authenticator: Authenticator
    schema: SchemaCheck
    events: RunEvents


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def get_ready_services(request: Request) -> Services:
    """Services for routes that need the database with a current schema; 503 otherwise."""
    services = get_services(request)
    status = await services.schema.status()
    if not status.reachable:
        raise ApiError(503, "database_unavailable", "database unreachable")
    if not status.current:
        raise ApiError(
            503,
            "schema_behind",
            "database schema is not at the current migration; run `alembic upgrade head`",
        )
    return services


async def require_api_caller(request: Request) -> str | None:
    """Guard for `/v1`: the caller's verified email, or 401/403/503 in the error shape."""
    services = get_services(request)
    try:
        return await services.api_authenticator.verify_request(request.headers)
    except AuthError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None


async def require_ui_viewer(request: Request) -> str | None:
    """Guard for the run viewer's pages: the viewer's verified email (None when UI_AUTH=none),
    or 401/403/503 in the error shape."""
    services = get_services(request)
    try:
        return await services.ui_authenticator.verify_request(request.headers)
    except AuthError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None


ServicesDep = Annotated[Services, Depends(get_services)]
ReadyServicesDep = Annotated[Services, Depends(get_ready_services)]
