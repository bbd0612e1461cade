"""Request and response bodies of the `/v1` API (field names of the reference API)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, Field, field_validator

from app.domain.ideas import validate_extra_context, validate_idea
from app.domain.models import DecisionLabel, Priority, RunType
from app.domain.revisions import MAX_EDIT_NOTES_CHARS

MAX_LIST_LIMIT = 100
MAX_LIST_OFFSET = 2**31 - 1  # far beyond any real page, well inside a PostgreSQL bigint


class ErrorBody(BaseModel):
    """The one error shape of the HTTP API."""

    code: str = Field(description="machine-readable error code, e.g. validation_error")
    message: str
    details: Any = None
    request_id: str | None = Field(description="the X-Request-ID of the request")
    detail: str = Field(description="the message again, for clients of the reference API")


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` documenting `statuses` as answered with the error shape."""
    return {status: {"model": ErrorBody} for status in statuses}


def _in_utc(value: datetime) -> datetime:
    # Only instants that exist in UTC can be compared with the stored UTC timestamps.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("date-time is out of range once converted to UTC") from None


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_in_utc)]
"""A date-time with a timezone, converted to UTC (naive or out-of-range values are invalid)."""


class RunFilters(BaseModel):
    """The page and filters of a runs list (`GET /v1/runs`, the run viewer's list)."""

    limit: int = Field(default=20, ge=1, le=MAX_LIST_LIMIT)
    offset: int = Field(default=0, ge=0, le=MAX_LIST_OFFSET)
    status: Literal["queued", "running", "completed", "failed"] | None = None
    decision: DecisionLabel | None = None
    run_type: RunType | None = None
    parent_run_id: uuid.UUID | None = None
    min_confidence: float | None = Field(default=None, ge=0.0, le=1.0, allow_inf_nan=False)
    created_after: UtcDatetime | None = Field(
        default=None, description="created at or after (inclusive)"
    )
    created_before: UtcDatetime | None = Field(
        default=None, description="created before (exclusive)"
    )
    start_date: UtcDatetime | None = Field(
        default=None, description="the reference's name: created at or after"
    )
    end_date: UtcDatetime | None = Field(
        default=None, description="the reference's name: created at or before"
    )


class FullReviewRequest(BaseModel):
    idea: str = Field(description="1 to 10 000 characters, at most 10 sentences")
    extra_context: str | dict[str, Any] | None = None
    priority: Priority = Field(
        default="normal", description="high-priority runs use their own topic and go first"
    )

    @field_validator("idea")
    @classmethod
    def _idea(cls, value: str) -> str:
        return validate_idea(value)

    @field_validator("extra_context")
    @classmethod
    def _extra(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        return validate_extra_context(value)


class RevisionRequest(BaseModel):
    """A revision of a completed run (the reference's body); give at least one of the edits."""

    edited_proposal: str | dict[str, Any] | None = Field(
        default=None,
        description=(
            "Proposal fields that replace the parent's (an object with some of title, summary, "
            "problem_statement, proposed_solution, assumptions, scope_non_goals), or the "
            "proposal as markdown text (`# title`, summary, `## Problem Statement`, ...); "
            "other text is read as edit notes. At most 100 000 characters."
        ),
    )
    edit_notes: str | None = Field(
        default=None,
        max_length=MAX_EDIT_NOTES_CHARS,
        description="What to change: one LLM call revises the proposal along these notes.",
    )
    input_idea: str | None = Field(default=None, description="replaces the parent's idea")
    extra_context: str | dict[str, Any] | None = Field(
        default=None, description="replaces the parent's extra context"
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[\w.:/-]+$",
        description="model for this run's calls (default: the configured ones)",
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    priority: Priority | None = Field(default=None, description="default: the parent's")

    @field_validator("input_idea")
    @classmethod
    def _idea(cls, value: str | None) -> str | None:
        return None if value is None else validate_idea(value)

    @field_validator("extra_context")
    @classmethod
    def _extra(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        return validate_extra_context(value)


class FullReviewAccepted(BaseModel):
    run_id: str
    status: str
    run_type: RunType
    priority: Priority
    parent_run_id: str | None = None
    created_at: datetime
    queued_at: datetime
    message: str


_COST = (
    "US dollars of the calls at LLM_PRICES (no cached-input discount); null when a model used "
    "has no price"
)


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0


class StepProgressOut(BaseModel):
    step_name: str
    step_order: int
    status: str
    started_at: datetime | None
    completed_at: datetime | None
    error_message: str | None
    attempts: int
    model: str | None = Field(
        description="the model of the step's last LLM call (null: the step made none)"
    )
    usage: Usage = Field(description="tokens of all the step's calls")
    cost_usd: float | None = Field(description="all the step's calls: " + _COST)
    reused_from_run_id: str | None = Field(
        description=(
            "set on a revision's review taken over from its parent without a call (status "
            "`completed`, no attempts, no tokens): the run whose call made it"
        )
    )


class RunSummary(BaseModel):
    run_id: str
    status: str
    run_type: RunType
    priority: Priority
    parent_run_id: str | None
    created_at: datetime
    updated_at: datetime
    queued_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    input_idea: str
    decision_label: str | None
    overall_weighted_confidence: float | None
    error_message: str | None
    proposal_title: str | None
    proposal_summary: str | None
    retry_count: int = Field(description="deliveries after the first that worked on the run")
    cost_usd: float | None = Field(description="the run's steps' cost: " + _COST)
    deferred_until: datetime | None = Field(
        description=(
            "set when a delivery found DAILY_BUDGET_USD spent before the run started: it "
            "stays queued and is re-enqueued after this moment (the budget's next UTC day)"
        )
    )


class RunDetail(RunSummary):
    extra_context: str | dict[str, Any] | None
    model: str = Field(description="model of the reviews (the expansion may use another)")
    temperature: float
    schema_version: str
    prompt_set_version: str
    revision: dict[str, Any] | None = Field(
        description="a revision's request: edited_proposal and edit_notes"
    )
    proposal: dict[str, Any] | None
    persona_reviews: list[dict[str, Any]] = Field(
        description="full reviews, with blocking_issues_present and security_concerns_present"
    )
    decision: dict[str, Any] | None = Field(
        description=(
            "the decision; minority_reports carry blocking_summary and "
            "mitigation_recommendation, detailed_score_breakdown the per-persona scores"
        )
    )
    step_progress: list[StepProgressOut]
    usage: Usage
    delivery_count: int
    last_delivery_attempt: int | None
    lease_owner: str | None
    lease_expires_at: datetime | None


class RunList(BaseModel):
    runs: list[RunSummary]
    total: int
    limit: int
    offset: int
