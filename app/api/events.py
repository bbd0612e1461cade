"""`GET /v1/runs/{run_id}/events`: a run's progress as Server-Sent Events.

Each event is `id: <seq>` (numbered 1, 2, 3... per run), `event: <name>` and one line of JSON
data. A client that reconnects sends `Last-Event-ID` and receives what came after it (browsers'
EventSource does so by itself); `?after=<seq>` does the same for a first connection, e.g. a page
that already shows the run as of that event. The stream ends after `run_completed` or
`run_failed`; for a finished run with nothing left to send the answer is 204, which tells
EventSource to stop.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from loguru import logger

from app.api.deps import ReadyServicesDep, Services, require_api_caller
from app.api.errors import ApiError
from app.api.schemas import error_responses
from app.errors import StoreUnavailable
from app.events import RunEvents, Signal
from app.store.events import RunEvent
from app.store.runs import RunStatus

# What EventSource waits before reconnecting, in milliseconds.
RECONNECT_MS = 2000
# A comment this often keeps proxies and load balancers from closing an idle stream.
KEEPALIVE_SECONDS = 15.0
# A stream ends after this long and the client resumes from its Last-Event-ID: well inside
# Cloud Run's request timeout, and no connection pinned to one instance for hours.
STREAM_MAX_SECONDS = 300.0
MAX_EVENT_ID = 2**31 - 1
_FINISHED = frozenset({RunStatus.COMPLETED, RunStatus.FAILED})

router = APIRouter(
    prefix="/v1",
    tags=["runs"],
    dependencies=[Depends(require_api_caller)],
    responses=error_responses(401, 403, 422, 503),
)


@router.get(
    "/runs/{run_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "the run's events as they happen (Server-Sent Events)",
            "content": {"text/event-stream": {}},
        },
        204: {"description": "the run finished and every event was sent already"},
        **error_responses(404),
    },
)
async def run_events(
    run_id: str,
    request: Request,
    services: ReadyServicesDep,
    last_event_id: Annotated[
        str | None,
        Header(description="the id of the last event received: resume after it"),
    ] = None,
    after: Annotated[
        str | None,
        Query(description="start after this event id (Last-Event-ID, when sent, wins)"),
    ] = None,
) -> Response:
    """Stream the run's step and run events, from after `Last-Event-ID` or `after` (else the
    first)."""
    return await event_stream_response(run_id, request, services)


async def event_stream_response(run_id: str, request: Request, services: Services) -> Response:
    """The run's event stream for `request` (its Last-Event-ID header is read here); the run
    viewer's own route answers with this too."""
    # A reconnecting EventSource sends Last-Event-ID, newer than the `after` of its URL.
    after = _last_event_id(
        request.headers.get("last-event-id") or request.query_params.get("after")
    )
    status, backlog = await services.events.backlog(run_id, after)
    if status is None:
        raise ApiError(404, "not_found", f"run {run_id} not found")
    if not backlog and status in _FINISHED:
        return Response(status_code=204)
    return StreamingResponse(
        _stream(run_id, after, services.events),
        media_type="text/event-stream",
        # no-transform: no proxy may buffer or compress the stream.
        headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"},
    )


async def _stream(run_id: str, last: int, events: RunEvents) -> AsyncIterator[str]:
    try:
        async for chunk in _events_after(run_id, last, events):
            yield chunk
    except StoreUnavailable as exc:
        # The answer has started: end the stream; the client resumes from its last event.
        logger.warning("run events: stream of run {} ended early ({})", run_id, exc)


async def _events_after(run_id: str, last: int, events: RunEvents) -> AsyncIterator[str]:
    deadline = time.monotonic() + STREAM_MAX_SECONDS
    with events.subscribe(run_id) as subscription:
        yield f"retry: {RECONNECT_MS}\n\n"
        # Read after subscribing, so nothing committed in between is lost.
        _, pending = await events.backlog(run_id, last)
        while True:
            for event in pending:
                if event.seq <= last:
                    continue
                yield _format(event)
                last = event.seq
                if event.terminal:
                    return
            pending = ()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            item = await subscription.get(min(KEEPALIVE_SECONDS, remaining))
            if item is None:
                yield ": keepalive\n\n"
            elif item is Signal.CLOSED:
                return
            elif item is Signal.RESYNC or item.seq > last + 1:
                # Numbers are contiguous per run: a gap means something did not arrive live.
                _, pending = await events.backlog(run_id, last)
            else:
                pending = (item,)


def _format(event: RunEvent) -> str:
    data = json.dumps(event.payload(), separators=(",", ":"), ensure_ascii=False)
    return f"id: {event.seq}\nevent: {event.event}\ndata: {data}\n\n"


def _last_event_id(value: str | None) -> int:
    """The number after which to resume: 0 without the header; 422 unless it is one of ours."""
    if value is None or value == "":
        return 0
    if not value.isascii() or not value.isdigit() or int(value) > MAX_EVENT_ID:
        raise ApiError(
            422, "validation_error", "Last-Event-ID and after must be an event id (0 or more)"
        )
    return int(value)
