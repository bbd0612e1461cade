"""Request and response bodies of the `/v1` API (field names of the reference API)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, field_validator

from app.domain.ideas import validate_extra_context, validate_idea


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
