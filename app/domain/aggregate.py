"""Deterministic aggregation of the persona reviews into a decision (no LLM)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from app.domain.models import (
    Decision,
    DecisionLabel,
    MinorityReport,
    PersonaContribution,
    PersonaReview,
)
from app.domain.personas import (
    APPROVE_THRESHOLD,
    DISSENT_THRESHOLD,
    PERSONAS,
    REVISE_THRESHOLD,
    VETO_PERSONA_ID,
)

# Scores are rounded before comparing so that 5 x 0.80 is exactly 0.80, not 0.7999999999999999.
_PRECISION = 6


def aggregate(reviews: Sequence[PersonaReview]) -> Decision:
    """Weighted confidence, threshold decision, security veto and minority reports."""
    by_id = {r.persona_id: r for r in reviews}
    missing = [p.persona_id for p in PERSONAS if p.persona_id not in by_id]
    if missing or len(by_id) != len(PERSONAS):
        raise ValueError(f"aggregate needs exactly one review per persona; missing {missing}")

    breakdown = [
        PersonaContribution(
            persona_id=p.persona_id,
            persona_name=p.name,
            weight=p.weight,
            confidence_score=by_id[p.persona_id].confidence_score,
            weighted_contribution=round(p.weight * by_id[p.persona_id].confidence_score, 6),
        )
        for p in PERSONAS
    ]
    overall = round(
        math.fsum(p.weight * by_id[p.persona_id].confidence_score for p in PERSONAS), _PRECISION
    )

    label: DecisionLabel
    if overall >= APPROVE_THRESHOLD:
        label = "approve"
    elif overall >= REVISE_THRESHOLD:
        label = "revise"
    else:
        label = "reject"

    veto = label == "approve" and any(
        issue.security_critical for issue in by_id[VETO_PERSONA_ID].blocking_issues
    )
    if veto:
        label = "revise"

    return Decision(
        decision=label,
        overall_weighted_confidence=overall,
        security_veto_applied=veto,
        breakdown=breakdown,
        minority_reports=_minority_reports(label, [by_id[p.persona_id] for p in PERSONAS]),
    )


def _minority_reports(label: DecisionLabel, reviews: list[PersonaReview]) -> list[MinorityReport]:
    reports = []
    for review in reviews:
        reasons = []
        if label == "approve" and review.confidence_score < DISSENT_THRESHOLD:
            reasons.append(f"confidence {review.confidence_score:.2f} below {DISSENT_THRESHOLD}")
        if label in ("approve", "revise") and review.blocking_issues:
            reasons.append(f"{len(review.blocking_issues)} blocking issue(s)")
        if reasons:
            reports.append(
                MinorityReport(
                    persona_id=review.persona_id,
                    persona_name=review.persona_name,
                    confidence_score=review.confidence_score,
                    reason="; ".join(reasons),
                    blocking_issues=review.blocking_issues,
                    blocking_summary=_blocking_summary(review, reasons),
                    mitigation_recommendation=(
                        "; ".join(review.recommendations)
                        or "Resolve the concerns above, then request a revision."
                    ),
                    strengths=review.strengths,
                    concerns=[c.text for c in review.concerns],
                )
            )
    return reports


def _blocking_summary(review: PersonaReview, reasons: list[str]) -> str:
    """What holds the persona back: its blocking issues, else its blocking concerns, else why
    it dissents."""
    texts = [issue.text for issue in review.blocking_issues]
    texts = texts or [c.text for c in review.concerns if c.is_blocking]
    return "; ".join(texts) or "; ".join(reasons).capitalize() + "."
