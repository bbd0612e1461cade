"""`POST /pubsub/push`: the Pub/Sub push boundary."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from loguru import logger

from app.api.deps import ReadyServicesDep
from app.api.errors import error_response
from app.auth import AuthError
from app.push.policy import Outcome, status_for

router = APIRouter(tags=["push"])

_MESSAGES = {
    Outcome.LEASE_BUSY: ("lease_busy", "another delivery is working on this run"),
    Outcome.RETRY: ("retry_later", "transient failure; checkpoint kept, redeliver later"),
    Outcome.OVERLOADED: ("overloaded", "this instance is at its concurrency limit"),
    Outcome.SHUTTING_DOWN: ("shutting_down", "this instance is shutting down"),
}


@router.post("/pubsub/push", status_code=204, response_model=None)
async def pubsub_push(request: Request, services: ReadyServicesDep) -> Response:
    """Receive one push delivery; 2xx acknowledges it, anything else makes Pub/Sub redeliver."""
    try:
        email = await services.authenticator.verify(request.headers.get("authorization"))
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

    outcome = await services.receiver.handle(bytes(body), request.headers)
    status = status_for(outcome)
    if status < 300:
        return Response(status_code=status)
    code, message = _MESSAGES.get(outcome, ("error", outcome.value))
    return error_response(status, code, message)


def _too_large(limit: int) -> Response:
    logger.warning("push body over {} bytes refused", limit)
    return error_response(413, "payload_too_large", f"push body exceeds {limit} bytes")
