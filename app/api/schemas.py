"""Request and response bodies of the `/v1` API (field names of the reference API)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BaseModel, Field, field_validator

from app.domain.ideas import validate_extra_context, validate_idea

MAX_LIST_LIMIT = 100
MAX_LIST_OFFSET = 2**31 - 1  # far beyond any real page, well inside a PostgreSQL bigint


class ErrorBody(BaseModel):
    """The one error shape of the HTTP API."""

    code: str = Field(description="machine-readable error code, e.g. validation_error")
    message: str
    details: Any = None
    request_id: str | None = Field(description="the X-Request-ID of the request")


def _in_utc(value: datetime) -> datetime:
    # Only instants that exist in UTC can be compared with the stored UTC timestamps.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("date-time is out of range once converted to UTC") from None


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_in_utc)]
"""A date-time with a timezone, converted to UTC (naive or out-of-range values are invalid)."""


class FullReviewRequest(BaseModel):
    idea: str = Field(description="1 to 10 000 characters, at most 10 sentences")
    extra_context: str | dict[str, Any] | None = None

    @field_validator("idea")
    @classmethod
    def _idea(cls, value: str) -> str:
        return validate_idea(value)

    @field_validator("extra_context")
    @classmethod
    def _extra(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        return validate_extra_context(value)


class FullReviewAccepted(BaseModel):
    run_id: str
    status: str
    run_type: str
    priority: str
    created_at: datetime
    queued_at: datetime
    message: str


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
    usage: Usage


class RunSummary(BaseModel):
    run_id: str
    status: str
    run_type: str
    priority: str
    created_at: datetime
    updated_at: datetime
    queued_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    input_idea: str
    decision_label: str | None
    overall_weighted_confidence: float | None
    error_message: str | None


class RunDetail(RunSummary):
    extra_context: str | dict[str, Any] | None
    proposal: dict[str, Any] | None
    persona_reviews: list[dict[str, Any]]
    decision: dict[str, Any] | None
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
