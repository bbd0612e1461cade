"""`GET /v1/runs/{run_id}/diff/{other_run_id}`: two stored runs compared (`app/domain/diff.py`)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Depends

from app.api.deps import ReadyServicesDep, Services, require_api_caller
from app.api.errors import ApiError
from app.api.schemas import error_responses
from app.domain.diff import RunDiffResponse, RunSide, diff_runs
from app.domain.models import PersonaReview
from app.store.tables import Run

# As every /v1 route (app/api/runs.py): caller auth (401/403), request validation (422) and
# schema behind or identity provider unreachable (503).
router = APIRouter(
    prefix="/v1",
    tags=["runs"],
    dependencies=[Depends(require_api_caller)],
    responses=error_responses(401, 403, 422, 503),
)


@router.get(
    "/runs/{run_id}/diff/{other_run_id}",
    response_model=RunDiffResponse,
    responses=error_responses(400, 404),
    summary="Compare two runs",
    description=(
        "Run `run_id` (old, run1) against `other_run_id` (new, run2): each proposal field with "
        "its before/after values and a unified diff, each persona's confidence and blocking "
        "issues, and the decision. Any two runs, finished or not: what a run lacks is null. "
        "A parent and its revision are always compared parent (old) to revision (new), in "
        "whichever order the path names them. "
        "Computed from stored results; no model is called. 400 when both ids name the same "
        "run, 404 naming the id that matches no run."
    ),
)
async def get_run_diff(
    run_id: str, other_run_id: str, services: ReadyServicesDep
) -> RunDiffResponse:
    return await compare_runs(run_id, other_run_id, services)


async def compare_runs(run_id: str, other_run_id: str, services: Services) -> RunDiffResponse:
    """Two stored runs compared, parent before revision (the API's and the run viewer's diff).

    ApiError: 400 for the same run twice, 404 naming the parameter that matches no run.
    """
    if run_id == other_run_id:
        raise _same_run()
    first = _parse("run_id", run_id)
    second = _parse("other_run_id", other_run_id)
    if first == second:
        raise _same_run()
    run1 = await _load(services, "run_id", first)
    run2 = await _load(services, "other_run_id", second)
    if run1.parent_run_id == run2.id:
        # A revision against its parent (as the reference web app asks) reads parent -> child.
        run1, run2 = run2, run1
    return diff_runs(_side(run1), _side(run2))


def _same_run() -> ApiError:
    return ApiError(400, "same_run", "cannot diff a run against itself; give two different run ids")


def _parse(parameter: str, value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ApiError(
            404,
            "not_found",
            f"run not found: {parameter} is not a UUID",
            {"parameter": parameter},
        ) from None


async def _load(services: Services, parameter: str, run_id: str) -> Run:
    run = await services.store.get_run(run_id)
    if run is None:
        raise ApiError(
            404,
            "not_found",
            f"run {run_id} not found ({parameter})",
            {"parameter": parameter, "run_id": run_id},
        )
    return run


def _side(run: Run) -> RunSide:
    return RunSide(
        run_id=run.id,
        created_at=run.created_at,
        status=run.status,
        parent_run_id=run.parent_run_id,
        proposal=run.proposal,
        reviews=[PersonaReview.model_validate(row.review) for row in run.reviews],
        decision_label=run.decision_label,
        overall_weighted_confidence=run.overall_weighted_confidence,
    )
