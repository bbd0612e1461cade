"""`/v1`: submit a full review or a revision, read one run, list runs."""

from __future__ import annotations

import uuid
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from loguru import logger

from app.api.deps import ReadyServicesDep, Services, require_api_caller
from app.api.errors import ApiError
from app.api.schemas import (
    FullReviewAccepted,
    FullReviewRequest,
    RevisionRequest,
    RunDetail,
    RunFilters,
    RunList,
    RunSummary,
    StepProgressOut,
    Usage,
    error_responses,
)
from app.api.versions import pinned_versions
from app.domain.models import PersonaReview, TokenUsage
from app.domain.personas import PERSONAS
from app.domain.pricing import add_costs
from app.domain.revisions import read_edits
from app.publish import QueuedJob
from app.settings import Settings
from app.store.runs import RunStatus
from app.store.tables import Run

# Every /v1 route may answer these: caller auth (401/403), request validation (422) and
# schema behind or identity provider unreachable (503).
router = APIRouter(
    prefix="/v1",
    tags=["runs"],
    dependencies=[Depends(require_api_caller)],
    responses=error_responses(401, 403, 422, 503),
)
_PERSONA_ORDER = {p.persona_id: index for index, p in enumerate(PERSONAS)}


@router.post(
    "/full-review",
    status_code=202,
    response_model=FullReviewAccepted,
    dependencies=[Depends(pinned_versions)],
    # A body that cannot be parsed at all, or a version this deployment does not serve.
    responses=error_responses(400),
)
async def submit_full_review(
    body: FullReviewRequest, services: ReadyServicesDep
) -> FullReviewAccepted:
    """Create a queued run and hand it to the queue (or the in-process delivery)."""
    return await submit_review(body, services)


async def submit_review(body: FullReviewRequest, services: Services) -> FullReviewAccepted:
    """Create a queued run and hand it to the queue (the API's and the run viewer's submit)."""
    run = await services.store.create_run(body.idea, body.extra_context, priority=body.priority)
    return await _enqueue(run, services)


@router.post(
    "/runs/{run_id}/revisions",
    status_code=202,
    response_model=FullReviewAccepted,
    dependencies=[Depends(pinned_versions)],
    responses=error_responses(400, 404, 409),
)
async def create_revision(
    run_id: str, body: RevisionRequest, services: ReadyServicesDep
) -> FullReviewAccepted:
    """Queue a revision of a completed run: its edits applied, reviews re-run where needed."""
    return await revise_run(run_id, body, services)


async def revise_run(run_id: str, body: RevisionRequest, services: Services) -> FullReviewAccepted:
    """Queue a revision of run `run_id` (the API's and the run viewer's revise).

    ApiError: 422 for edits that change nothing or do not apply, 404, 409 unless completed.
    """
    try:
        read_edits(body.edited_proposal, body.edit_notes)
    except ValueError as exc:
        raise ApiError(422, "validation_error", str(exc)) from None
    parent = await find_run(run_id, services)
    if parent.status != RunStatus.COMPLETED:
        raise ApiError(
            409,
            "parent_not_completed",
            f"run {parent.id} is {parent.status}; only a completed run can be revised",
        )
    run = await services.store.create_revision(
        parent,
        idea=body.input_idea or parent.input_idea,
        extra_context=(parent.extra_context if body.extra_context is None else body.extra_context),
        edits={"edited_proposal": body.edited_proposal, "edit_notes": body.edit_notes},
        priority=body.priority or parent.priority,
        model=body.model or parent.model,
        temperature=parent.temperature if body.temperature is None else body.temperature,
    )
    return await _enqueue(run, services)


async def _enqueue(run: Run, services: Services) -> FullReviewAccepted:
    logger.info(
        "run enqueued",
        run_id=run.id,
        lifecycle_event="enqueued",
        run_type=run.run_type,
        priority=run.priority,
        parent_run_id=run.parent_run_id,
    )
    await services.outbox.publish(QueuedJob(run.id, run.run_type, run.priority))
    return FullReviewAccepted(
        run_id=run.id,
        status=run.status,
        run_type=run.run_type,
        priority=run.priority,
        parent_run_id=run.parent_run_id,
        created_at=run.created_at,
        queued_at=run.queued_at,
        message="Run queued; poll GET /v1/runs/{run_id} for progress.",
    )


async def find_run(run_id: str, services: Services) -> Run:
    """The run with its steps and reviews, or 404 (a non-UUID id names no run)."""
    try:
        run_id = str(uuid.UUID(run_id))
    except ValueError:
        raise ApiError(404, "not_found", "run not found: run_id is not a UUID") from None
    run = await services.store.get_run(run_id)
    if run is None:
        raise ApiError(404, "not_found", f"run {run_id} not found")
    return run


@router.get("/runs/{run_id}", response_model=RunDetail, responses=error_responses(404))
async def get_run(run_id: str, services: ReadyServicesDep) -> RunDetail:
    return run_detail(await find_run(run_id, services), services.settings)


def run_detail(run: Run, settings: Settings) -> RunDetail:
    """Everything known of a run (its steps and reviews loaded), as `GET /v1/runs/{id}`."""
    # Summed from the steps loaded with the run, as its cost is: no second query.
    usage = sum(
        (TokenUsage(s.input_tokens, s.output_tokens, s.total_tokens) for s in run.steps),
        TokenUsage(),
    )
    return RunDetail(
        **run_summary(run).model_dump(),
        extra_context=run.extra_context,
        model=run.model or settings.effective_review_model,
        temperature=settings.review_temperature if run.temperature is None else run.temperature,
        schema_version=run.schema_version,
        prompt_set_version=run.prompt_set_version,
        revision=run.revision,
        proposal=run.proposal,
        persona_reviews=[
            _review_out(row.review)
            for row in sorted(run.reviews, key=lambda r: _PERSONA_ORDER[r.persona_id])
        ],
        decision=_decision_out(run.decision),
        step_progress=[
            StepProgressOut(
                step_name=s.step_name,
                step_order=s.step_order,
                status=s.status,
                started_at=s.started_at,
                completed_at=s.completed_at,
                error_message=s.error_message,
                attempts=s.attempts,
                model=s.model,
                usage=Usage(
                    input_tokens=s.input_tokens,
                    output_tokens=s.output_tokens,
                    total_tokens=s.total_tokens,
                ),
                cost_usd=s.cost_usd,
                reused_from_run_id=s.reused_from_run_id,
            )
            for s in run.steps
        ],
        usage=Usage(**asdict(usage)),
        delivery_count=run.delivery_count,
        last_delivery_attempt=run.last_delivery_attempt,
        lease_owner=run.lease_owner,
        lease_expires_at=run.lease_expires_at,
    )


async def _known_parameters(request: Request) -> None:
    """A misspelt filter is an error, not a silently unfiltered list."""
    known = sorted(RunFilters.model_fields)
    unknown = sorted(set(request.query_params) - set(known))
    if unknown:
        raise ApiError(
            422,
            "validation_error",
            f"unknown query parameter(s): {', '.join(unknown)}",
            {"unknown": unknown, "known": known},
        )


@router.get("/runs", response_model=RunList, dependencies=[Depends(_known_parameters)])
async def list_runs(services: ReadyServicesDep, filters: Annotated[RunFilters, Query()]) -> RunList:
    """Runs newest first; every filter given must hold. Dates need a timezone."""
    return await find_runs(filters, services)


async def find_runs(filters: RunFilters, services: Services) -> RunList:
    """One page of runs, newest first, matching every filter (the API's and the viewer's list)."""
    # Both spellings may be given: the narrower bound holds. The reference's end_date is
    # inclusive, so the instant after it is the exclusive bound.
    lower = [d for d in (filters.created_after, filters.start_date) if d is not None]
    upper = [
        d
        for d in (filters.created_before, filters.end_date and _after(filters.end_date))
        if d is not None
    ]
    runs, total = await services.store.list_runs(
        filters.limit,
        filters.offset,
        status=filters.status,
        decision=filters.decision,
        run_type=filters.run_type,
        parent_run_id=None if filters.parent_run_id is None else str(filters.parent_run_id),
        min_confidence=filters.min_confidence,
        created_after=max(lower, default=None),
        created_before=min(upper, default=None),
    )
    return RunList(
        runs=[run_summary(r) for r in runs], total=total, limit=filters.limit, offset=filters.offset
    )


def run_summary(run: Run) -> RunSummary:
    """A run's list entry (its steps loaded, for the cost)."""
    proposal = run.proposal or {}
    return RunSummary(
        run_id=run.id,
        status=run.status,
        run_type=run.run_type,
        priority=run.priority,
        parent_run_id=run.parent_run_id,
        created_at=run.created_at,
        updated_at=run.updated_at,
        queued_at=run.queued_at,
        started_at=run.started_at,
        completed_at=run.completed_at,
        input_idea=run.input_idea,
        decision_label=run.decision_label,
        overall_weighted_confidence=run.overall_weighted_confidence,
        error_message=run.error_message,
        proposal_title=proposal.get("title"),
        proposal_summary=proposal.get("summary"),
        retry_count=max(run.delivery_count - 1, 0),
        # Summed from the steps loaded with the run: unknown once one step's is.
        cost_usd=add_costs(step.cost_usd for step in run.steps),
        deferred_until=run.deferred_until,
    )


def _after(instant: datetime) -> datetime:
    try:
        return instant + timedelta(microseconds=1)
    except OverflowError:
        return instant


def _review_out(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored review, with the flags the reference's clients read."""
    review = PersonaReview.model_validate(stored)
    return {
        **stored,
        "blocking_issues_present": review.blocking_issues_present,
        "security_concerns_present": review.security_concerns_present,
    }


def _decision_out(stored: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored decision, with the reference's names for what it already holds."""
    if stored is None:
        return None
    breakdown = stored.get("breakdown", [])
    return {
        **stored,
        "weighted_confidence": stored.get("overall_weighted_confidence"),
        "detailed_score_breakdown": {
            "weights": {p["persona_id"]: p["weight"] for p in breakdown},
            "individual_scores": {p["persona_id"]: p["confidence_score"] for p in breakdown},
            "weighted_contributions": {
                p["persona_id"]: p["weighted_contribution"] for p in breakdown
            },
            "formula": "overall_weighted_confidence = sum(weight * confidence_score)",
        },
    }
