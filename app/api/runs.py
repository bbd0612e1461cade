"""`/v1`: submit a full review, read one run, list runs."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from loguru import logger

from app.api.deps import ReadyServicesDep, require_api_caller
from app.api.errors import ApiError
from app.api.schemas import (
    MAX_LIST_LIMIT,
    MAX_LIST_OFFSET,
    ErrorBody,
    FullReviewAccepted,
    FullReviewRequest,
    RunDetail,
    RunList,
    RunSummary,
    StepProgressOut,
    Usage,
    UtcDatetime,
)
from app.domain.models import TokenUsage
from app.domain.personas import PERSONAS
from app.store.tables import Run


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in statuses}


# Every /v1 route may answer these: caller auth (401/403), request validation (422) and
# schema behind or identity provider unreachable (503).
router = APIRouter(
    prefix="/v1",
    tags=["runs"],
    dependencies=[Depends(require_api_caller)],
    responses=_errors(401, 403, 422, 503),
)
_PERSONA_ORDER = {p.persona_id: index for index, p in enumerate(PERSONAS)}


@router.post(
    "/full-review",
    status_code=202,
    response_model=FullReviewAccepted,
    responses=_errors(400),  # a body that cannot be parsed at all
)
async def submit_full_review(
    body: FullReviewRequest, services: ReadyServicesDep
) -> FullReviewAccepted:
    """Create a queued run and hand it to the queue (or the in-process delivery)."""
    run = await services.store.create_run(body.idea, body.extra_context)
    logger.info("run enqueued", run_id=run.id, lifecycle_event="enqueued")
    await services.outbox.publish(run.id)
    return FullReviewAccepted(
        run_id=run.id,
        status=run.status,
        run_type=run.run_type,
        priority=run.priority,
        created_at=run.created_at,
        queued_at=run.queued_at,
        message="Run queued; poll GET /v1/runs/{run_id} for progress.",
    )


@router.get("/runs/{run_id}", response_model=RunDetail, responses=_errors(404))
async def get_run(run_id: str, services: ReadyServicesDep) -> RunDetail:
    try:
        run_id = str(uuid.UUID(run_id))
    except ValueError:
        raise ApiError(404, "not_found", "run not found: run_id is not a UUID") from None
    run = await services.store.get_run(run_id)
    if run is None:
        raise ApiError(404, "not_found", f"run {run_id} not found")
    usage = (await services.store.usage_by_run([run.id])).get(run.id, TokenUsage())
    return RunDetail(
        **_summary(run).model_dump(),
        extra_context=run.extra_context,
        proposal=run.proposal,
        persona_reviews=[
            row.review for row in sorted(run.reviews, key=lambda r: _PERSONA_ORDER[r.persona_id])
        ],
        decision=run.decision,
        step_progress=[
            StepProgressOut(
                step_name=s.step_name,
                step_order=s.step_order,
                status=s.status,
                started_at=s.started_at,
                completed_at=s.completed_at,
                error_message=s.error_message,
                attempts=s.attempts,
                usage=Usage(
                    input_tokens=s.input_tokens,
                    output_tokens=s.output_tokens,
                    total_tokens=s.total_tokens,
                ),
            )
            for s in run.steps
        ],
        usage=Usage(**asdict(usage)),
        delivery_count=run.delivery_count,
        last_delivery_attempt=run.last_delivery_attempt,
        lease_owner=run.lease_owner,
        lease_expires_at=run.lease_expires_at,
    )


@router.get("/runs", response_model=RunList)
async def list_runs(
    services: ReadyServicesDep,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_LIST_OFFSET)] = 0,
    status: Literal["queued", "running", "completed", "failed"] | None = None,
    decision: Literal["approve", "revise", "reject"] | None = None,
    created_after: Annotated[UtcDatetime | None, Query()] = None,
    created_before: Annotated[UtcDatetime | None, Query()] = None,
) -> RunList:
    """Runs newest first, filtered by status, decision and creation time."""
    runs, total = await services.store.list_runs(
        limit, offset, status, decision, created_after, created_before
    )
    return RunList(runs=[_summary(r) for r in runs], total=total, limit=limit, offset=offset)


def _summary(run: Run) -> RunSummary:
    return RunSummary(
        run_id=run.id,
        status=run.status,
        run_type=run.run_type,
        priority=run.priority,
        created_at=run.created_at,
        updated_at=run.updated_at,
        queued_at=run.queued_at,
        started_at=run.started_at,
        completed_at=run.completed_at,
        input_idea=run.input_idea,
        decision_label=run.decision_label,
        overall_weighted_confidence=run.overall_weighted_confidence,
        error_message=run.error_message,
    )
