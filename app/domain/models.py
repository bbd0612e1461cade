"""Values the pipeline produces and consumes; pydantic only, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DecisionLabel = Literal["approve", "revise", "reject"]
Effort = Literal["small", "medium", "large", "very_large"]
RunType = Literal["initial", "revision"]
# High-priority runs travel on their own topic and subscription, and go first in-process.
Priority = Literal["normal", "high"]

# Version of the output shapes below; a client may pin it with the X-Schema-Version header.
SCHEMA_VERSION = "1.0.0"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Proposal(_Strict):
    """The expanded idea (output of the `expand` step)."""

    title: str
    summary: str
    problem_statement: str
    proposed_solution: str
    assumptions: list[str]
    scope_non_goals: list[str]


class RevisedProposal(Proposal):
    """The expand step's output when it revises a parent's proposal along edit notes."""


class Concern(_Strict):
    text: str
    is_blocking: bool


class BlockingIssue(_Strict):
    text: str
    security_critical: bool


class ReviewContent(_Strict):
    """What the model writes for one persona; identity fields are added by the code."""

    confidence_score: float = Field(ge=0.0, le=1.0)
    strengths: list[str]
    concerns: list[Concern]
    blocking_issues: list[BlockingIssue]
    recommendations: list[str]
    estimated_effort: Effort
    dependency_risks: list[str]


class PersonaReview(ReviewContent):
    """A full review: the model's content plus the persona it belongs to."""

    persona_id: str
    persona_name: str

    @property
    def blocking_issues_present(self) -> bool:
        return bool(self.blocking_issues)

    @property
    def security_concerns_present(self) -> bool:
        """A blocking issue marked security-critical (what the reference calls a concern)."""
        return any(issue.security_critical for issue in self.blocking_issues)


class PersonaContribution(_Strict):
    persona_id: str
    persona_name: str
    weight: float
    confidence_score: float
    weighted_contribution: float


class MinorityReport(_Strict):
    persona_id: str
    persona_name: str
    confidence_score: float
    reason: str
    blocking_issues: list[BlockingIssue]
    # The reference's reading of a dissent: what blocks, what would fix it.
    blocking_summary: str
    mitigation_recommendation: str
    strengths: list[str]
    concerns: list[str]


class Decision(_Strict):
    """Deterministic outcome of the five reviews."""

    decision: DecisionLabel
    overall_weighted_confidence: float
    security_veto_applied: bool
    breakdown: list[PersonaContribution]
    minority_reports: list[MinorityReport]


@dataclass(frozen=True)
class TokenUsage:
    """Tokens consumed by one or more LLM calls."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.total_tokens + other.total_tokens,
        )
