"""The Pub/Sub push boundary: `POST /pubsub/push` (jobs) and `POST /pubsub/dead-letter`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request, Response
from loguru import logger

from app.api.deps import ReadyServicesDep, Services
from app.api.errors import error_response
from app.api.schemas import ErrorBody
from app.auth import AuthError
from app.push.policy import Outcome, status_for

router = APIRouter(tags=["push"])

_MESSAGES = {
    Outcome.LEASE_BUSY: ("lease_busy", "another delivery is working on this run"),
    Outcome.RETRY: ("retry_later", "transient failure; checkpoint kept, redeliver later"),
    Outcome.OVERLOADED: ("overloaded", "this instance is at its concurrency limit"),
    Outcome.SHUTTING_DOWN: ("shutting_down", "this instance is shutting down"),
}

_PUSH_RESPONSES: dict[int | str, dict[str, Any]] = {
    204: {"description": "acknowledged: completed, duplicate, failed for good, or quarantined"},
    401: {"model": ErrorBody, "description": "missing or invalid OIDC token"},
    403: {"model": ErrorBody, "description": "a token of an account not allowed to push"},
    409: {"model": ErrorBody, "description": "another delivery holds the run's live lease"},
    413: {"model": ErrorBody, "description": "body over PUSH_MAX_BODY_BYTES"},
    503: {
        "model": ErrorBody,
        "description": "transient failure, overloaded, shutting down or database unavailable",
    },
}

Handler = Callable[[bytes, Mapping[str, str]], Awaitable[Outcome]]


@router.post("/pubsub/push", status_code=204, response_model=None, responses=_PUSH_RESPONSES)
async def pubsub_push(request: Request, services: ReadyServicesDep) -> Response:
    """Receive one push delivery; 2xx acknowledges it, anything else makes Pub/Sub redeliver."""
    return await _deliver(request, services, services.receiver.handle)


@router.post("/pubsub/dead-letter", status_code=204, response_model=None, responses=_PUSH_RESPONSES)
async def pubsub_dead_letter(request: Request, services: ReadyServicesDep) -> Response:
    """Receive a job Pub/Sub dead-lettered: re-enqueued while the job timeout allows, else
    failed; acknowledged and recorded either way."""
    return await _deliver(request, services, services.dead_letters.handle)


async def _deliver(request: Request, services: Services, handle: Handler) -> Response:
    try:
        email = await services.authenticator.verify_request(request.headers)
    except AuthError as exc:
        logger.warning("push delivery refused: {}", exc.message, status=exc.status)
        return error_response(exc.status, exc.code, exc.message)
    if email is not None:
        logger.debug("push delivery from {}", email)
    limit = services.settings.push_max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            return _too_large(limit)

    outcome = await handle(bytes(body), request.headers)
    status = status_for(outcome)
    if status < 300:
        return Response(status_code=status)
    code, message = _MESSAGES.get(outcome, ("error", outcome.value))
    return error_response(status, code, message)


def _too_large(limit: int) -> Response:
    logger.warning("push body over {} bytes refused", limit)
    return error_response(413, "payload_too_large", f"push body exceeds {limit} bytes")
