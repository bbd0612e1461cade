"""`POST /tasks/sweep`: one round of the stale-run sweep, for Cloud Scheduler.

Authenticated like a push delivery (the scheduler job sends an OIDC token of the push service
account), so no new principal is trusted.
"""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request
from pydantic import BaseModel

from app.api.deps import ReadyServicesDep
from app.api.errors import ApiError
from app.api.schemas import ErrorBody
from app.auth import AuthError

router = APIRouter(tags=["tasks"])


class SweepResult(BaseModel):
    timed_out: int
    requeued: int
    published: int


@router.post(
    "/tasks/sweep",
    response_model=SweepResult,
    responses={
        401: {"model": ErrorBody},
        403: {"model": ErrorBody},
        503: {"model": ErrorBody, "description": "database unavailable; the next tick retries"},
    },
)
async def sweep(request: Request, services: ReadyServicesDep) -> SweepResult:
    """Fail timed-out runs, re-enqueue stale ones, publish what the queue never accepted."""
    try:
        await services.authenticator.verify_request(request.headers)
    except AuthError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    report = await services.sweeper.sweep_once()
    return SweepResult(**asdict(report))
