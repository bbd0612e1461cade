"""The deterministic aggregation: weights, inclusive thresholds, the veto, minority reports."""

from __future__ import annotations

import pytest

from app.domain.aggregate import aggregate
from app.domain.models import BlockingIssue, PersonaReview
from app.domain.personas import PERSONAS, validate_policy

ORDER = ["architect", "critic", "optimist", "security_guardian", "user_advocate"]


def reviews(
    scores: list[float], blocking: dict[str, list[BlockingIssue]] | None = None
) -> list[PersonaReview]:
    names = {p.persona_id: p.name for p in PERSONAS}
    return [
        PersonaReview(
            persona_id=pid,
            persona_name=names[pid],
            confidence_score=score,
            strengths=[],
            concerns=[],
            blocking_issues=(blocking or {}).get(pid, []),
            recommendations=[],
            estimated_effort="medium",
            dependency_risks=[],
        )
        for pid, score in zip(ORDER, scores, strict=True)
    ]


def test_policy_is_valid() -> None:
    validate_policy()


def test_all_at_threshold_approve_inclusive() -> None:
    decision = aggregate(reviews([0.80] * 5))
    assert decision.overall_weighted_confidence == 0.8
    assert decision.decision == "approve"
    assert decision.minority_reports == []


def test_weighted_mean_below_threshold_is_revise() -> None:
    decision = aggregate(reviews([0.80, 0.70, 0.90, 0.75, 0.85]))
    assert decision.overall_weighted_confidence == pytest.approx(0.7875, abs=1e-9)
    assert decision.decision == "revise"
    contributions = {c.persona_id: c.weighted_contribution for c in decision.breakdown}
    assert contributions == pytest.approx(
        {
            "architect": 0.2,
            "critic": 0.175,
            "optimist": 0.135,
            "security_guardian": 0.15,
            "user_advocate": 0.1275,
        }
    )


def test_security_critical_blocking_issue_vetoes_approve() -> None:
    issue = BlockingIssue(text="stores passwords in clear", security_critical=True)
    decision = aggregate(reviews([0.90, 0.85, 0.95, 0.80, 0.90], {"security_guardian": [issue]}))
    assert decision.overall_weighted_confidence >= 0.80
    assert decision.decision == "revise"
    assert decision.security_veto_applied
    assert [r.persona_id for r in decision.minority_reports] == ["security_guardian"]


def test_non_critical_blocking_issue_does_not_veto() -> None:
    issue = BlockingIssue(text="needs a threat model", security_critical=False)
    decision = aggregate(reviews([0.90, 0.85, 0.95, 0.80, 0.90], {"security_guardian": [issue]}))
    assert decision.decision == "approve"
    assert not decision.security_veto_applied


def test_low_score_with_security_critical_issue_is_reject() -> None:
    issue = BlockingIssue(text="remote code execution", security_critical=True)
    decision = aggregate(reviews([0.5, 0.5, 0.6, 0.3, 0.5], {"security_guardian": [issue]}))
    assert decision.overall_weighted_confidence < 0.60
    assert decision.decision == "reject"
    assert not decision.security_veto_applied


def test_approve_with_one_dissenter_gets_one_minority_report() -> None:
    decision = aggregate(reviews([0.95, 0.95, 0.55, 0.95, 0.95]))
    assert decision.decision == "approve"
    assert len(decision.minority_reports) == 1
    report = decision.minority_reports[0]
    assert report.persona_id == "optimist"
    assert report.confidence_score == 0.55


def test_revise_reports_only_personas_with_blocking_issues() -> None:
    issue = BlockingIssue(text="no rollback plan", security_critical=False)
    decision = aggregate(reviews([0.70, 0.40, 0.70, 0.70, 0.70], {"architect": [issue]}))
    assert decision.decision == "revise"
    assert [r.persona_id for r in decision.minority_reports] == ["architect"]


def test_missing_review_is_refused() -> None:
    with pytest.raises(ValueError, match="missing"):
        aggregate(reviews([0.8] * 5)[:4])
