"""Compare two runs: proposal fields, persona reviews and the decision, from stored results only.

Pure: the caller reads both runs and describes each as a `RunSide`; `diff_runs` answers the
reference's `{metadata, proposal_changes, persona_deltas, decision_delta}`. Any two runs can be
compared, finished or not: what a run does not have yet comes out as null, never as an error.

Beside the reference's keys the answer carries the names its web app reads (`run_id`,
`old_confidence`, `old_decision`, ...), so that app renders it in full.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from app.domain.models import PersonaReview
from app.domain.personas import PERSONAS

PROPOSAL_FIELDS: tuple[str, ...] = (
    "title",
    "summary",
    "problem_statement",
    "proposed_solution",
    "assumptions",
    "scope_non_goals",
)
DIFF_CONTEXT_LINES = 3
MAX_DIFF_LINES = 50  # longer diffs are cut, with a last line saying how much; values stay whole
_PERSONA_ORDER = {p.persona_id: index for index, p in enumerate(PERSONAS)}

Relationship = Literal["run1_is_parent_of_run2", "run2_is_parent_of_run1", "unrelated"]
FieldStatus = Literal["unchanged", "modified", "added", "removed"]
MissingStatus = Literal["run1_missing", "run2_missing", "both_missing"]
PersonaStatus = Literal["in_both", "added_in_run2", "removed_in_run2"]
FieldValue = str | list[str]


@dataclass(frozen=True)
class RunSide:
    """What the diff needs to know of one run."""

    run_id: str
    created_at: datetime
    status: str
    parent_run_id: str | None = None
    proposal: Mapping[str, Any] | None = None
    reviews: Sequence[PersonaReview] = ()
    decision_label: str | None = None
    overall_weighted_confidence: float | None = None


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DiffMetadata(_Out):
    run1_id: str
    run2_id: str
    run1_created_at: datetime
    run2_created_at: datetime
    run1_status: str
    run2_status: str
    is_parent_child: bool
    relationship: Relationship
    # The same facts under the names the reference web app reads.
    run_id: str = Field(description="= run1_id")
    other_run_id: str = Field(description="= run2_id")
    run_created_at: datetime = Field(description="= run1_created_at")
    other_run_created_at: datetime = Field(description="= run2_created_at")
    parent_child_relationship: Relationship | None = Field(
        description="= relationship when the runs are parent and child, else null"
    )


class FieldChange(_Out):
    """One proposal field; a list field is compared one item per line."""

    status: FieldStatus
    old_value: FieldValue | None = Field(description="the value in run1; null when absent")
    new_value: FieldValue | None = Field(description="the value in run2; null when absent")
    old_length: int | None = Field(description="characters compared in run1 (items joined by \\n)")
    new_length: int | None = Field(description="characters compared in run2 (items joined by \\n)")
    diff: list[str] | None = Field(
        description=(
            "for a modified field, the unified diff, one line per item, each ending in \\n "
            f"(joined, the diff text); cut after {MAX_DIFF_LINES} lines"
        )
    )


class ProposalChanges(_Out):
    """Each proposal field of run1 against run2."""

    title: FieldChange
    summary: FieldChange
    problem_statement: FieldChange
    proposed_solution: FieldChange
    assumptions: FieldChange
    scope_non_goals: FieldChange


class ProposalMissing(_Out):
    """At least one of the runs has no proposal yet (unfinished, or failed before it)."""

    status: MissingStatus


class PersonaDelta(_Out):
    persona_id: str
    persona_name: str
    status: PersonaStatus = Field(
        description="added_in_run2 / removed_in_run2: the persona has no review in run1 / run2"
    )
    old_confidence: float | None
    new_confidence: float | None
    confidence_delta: float | None = Field(description="new - old; null unless both exist")
    old_blocking_issues: bool | None = Field(description="run1's review has blocking issues")
    new_blocking_issues: bool | None
    blocking_changed: bool | None = Field(description="null unless both reviews exist")
    old_security_concerns: bool | None = Field(
        description="run1's review has a security-critical blocking issue"
    )
    new_security_concerns: bool | None
    security_concerns_changed: bool | None = Field(description="null unless both reviews exist")
    blocking_issues_added: list[str] = Field(description="blocking issue texts new in run2")
    blocking_issues_removed: list[str] = Field(description="blocking issue texts gone in run2")


class DecisionDelta(_Out):
    old_overall_weighted_confidence: float | None
    new_overall_weighted_confidence: float | None
    confidence_delta: float | None = Field(description="new - old; null unless both exist")
    old_decision_label: str | None
    new_decision_label: str | None
    decision_changed: bool
    # The same facts under the names the reference web app reads.
    old_confidence: float | None = Field(description="= old_overall_weighted_confidence")
    new_confidence: float | None = Field(description="= new_overall_weighted_confidence")
    old_decision: str | None = Field(description="= old_decision_label")
    new_decision: str | None = Field(description="= new_decision_label")


class RunDiffResponse(_Out):
    """Run1 (old) against run2 (new); named as the reference's, which its web client imports."""

    metadata: DiffMetadata
    proposal_changes: ProposalChanges | ProposalMissing
    persona_deltas: list[PersonaDelta]
    decision_delta: DecisionDelta


def diff_runs(run1: RunSide, run2: RunSide) -> RunDiffResponse:
    """Run1 against run2, from what each has stored so far."""
    return RunDiffResponse(
        metadata=_metadata(run1, run2),
        proposal_changes=proposal_changes(run1.proposal, run2.proposal),
        persona_deltas=persona_deltas(run1.reviews, run2.reviews),
        decision_delta=_decision_delta(run1, run2),
    )


def _metadata(run1: RunSide, run2: RunSide) -> DiffMetadata:
    relationship: Relationship = "unrelated"
    if run2.parent_run_id == run1.run_id:
        relationship = "run1_is_parent_of_run2"
    elif run1.parent_run_id == run2.run_id:
        relationship = "run2_is_parent_of_run1"
    is_parent_child = relationship != "unrelated"
    return DiffMetadata(
        run1_id=run1.run_id,
        run2_id=run2.run_id,
        run1_created_at=run1.created_at,
        run2_created_at=run2.created_at,
        run1_status=run1.status,
        run2_status=run2.status,
        is_parent_child=is_parent_child,
        relationship=relationship,
        run_id=run1.run_id,
        other_run_id=run2.run_id,
        run_created_at=run1.created_at,
        other_run_created_at=run2.created_at,
        parent_child_relationship=relationship if is_parent_child else None,
    )


def proposal_changes(
    old: Mapping[str, Any] | None, new: Mapping[str, Any] | None
) -> ProposalChanges | ProposalMissing:
    """Field by field, or which side has no proposal."""
    if old is None and new is None:
        return ProposalMissing(status="both_missing")
    if old is None:
        return ProposalMissing(status="run1_missing")
    if new is None:
        return ProposalMissing(status="run2_missing")
    return ProposalChanges(
        **{name: field_change(old.get(name), new.get(name)) for name in PROPOSAL_FIELDS}
    )


def field_change(old: Any, new: Any) -> FieldChange:
    """One field: text compared line by line, a list one item per line."""
    old_value, new_value = _value(old), _value(new)
    old_text = None if old_value is None else _text(old_value)
    new_text = None if new_value is None else _text(new_value)
    status: FieldStatus
    diff = None
    if old_text is None and new_text is None:
        status = "unchanged"
    elif old_text is None:
        status = "added"
    elif new_text is None:
        status = "removed"
    elif old_text == new_text:
        status = "unchanged"
    else:
        status = "modified"
        diff = unified_diff(old_text, new_text)
    return FieldChange(
        status=status,
        old_value=old_value,
        new_value=new_value,
        old_length=None if old_text is None else len(old_text),
        new_length=None if new_text is None else len(new_text),
        diff=diff,
    )


def unified_diff(old_text: str, new_text: str) -> list[str]:
    """The unified diff of two texts, each line ending in one newline; cut if long."""
    lines = [
        f"{line}\n"
        for line in difflib.unified_diff(
            old_text.splitlines(),
            new_text.splitlines(),
            fromfile="run1",
            tofile="run2",
            n=DIFF_CONTEXT_LINES,
            lineterm="",
        )
    ]
    if len(lines) > MAX_DIFF_LINES:
        cut = len(lines) - MAX_DIFF_LINES
        lines = [*lines[:MAX_DIFF_LINES], f"... (truncated {cut} lines)\n"]
    return lines


def _value(value: Any) -> FieldValue | None:
    if value is None:
        return None
    if isinstance(value, list | tuple):
        return [str(item) for item in value]
    return str(value)


def _text(value: FieldValue) -> str:
    return "\n".join(value) if isinstance(value, list) else value


def persona_deltas(
    old: Sequence[PersonaReview], new: Sequence[PersonaReview]
) -> list[PersonaDelta]:
    """One entry per persona reviewed in either run, in the personas' order."""
    old_by_id = {r.persona_id: r for r in old}
    new_by_id = {r.persona_id: r for r in new}
    ids = sorted(
        old_by_id.keys() | new_by_id.keys(),
        key=lambda persona_id: (_PERSONA_ORDER.get(persona_id, len(_PERSONA_ORDER)), persona_id),
    )
    return [_persona_delta(old_by_id.get(i), new_by_id.get(i)) for i in ids]


def _persona_delta(old: PersonaReview | None, new: PersonaReview | None) -> PersonaDelta:
    status: PersonaStatus
    if old is not None and new is not None:
        status = "in_both"
    elif old is None:
        status = "added_in_run2"
    else:
        status = "removed_in_run2"
    either = new if new is not None else old
    assert either is not None
    old_facts = _facts(old)
    new_facts = _facts(new)
    both = status == "in_both"
    old_texts = _blocking_texts(old)
    new_texts = _blocking_texts(new)
    return PersonaDelta(
        persona_id=either.persona_id,
        persona_name=either.persona_name,
        status=status,
        old_confidence=old_facts.confidence,
        new_confidence=new_facts.confidence,
        confidence_delta=_delta(old_facts.confidence, new_facts.confidence),
        old_blocking_issues=old_facts.blocking,
        new_blocking_issues=new_facts.blocking,
        blocking_changed=old_facts.blocking != new_facts.blocking if both else None,
        old_security_concerns=old_facts.security,
        new_security_concerns=new_facts.security,
        security_concerns_changed=old_facts.security != new_facts.security if both else None,
        blocking_issues_added=[t for t in new_texts if t not in old_texts],
        blocking_issues_removed=[t for t in old_texts if t not in new_texts],
    )


class _Facts(NamedTuple):
    """What is compared of one persona's review; all null when it has none."""

    confidence: float | None = None
    blocking: bool | None = None
    security: bool | None = None


def _facts(review: PersonaReview | None) -> _Facts:
    if review is None:
        return _Facts()
    return _Facts(
        review.confidence_score, review.blocking_issues_present, review.security_concerns_present
    )


def _blocking_texts(review: PersonaReview | None) -> list[str]:
    """The review's blocking issue texts, stripped, each once, in order."""
    if review is None:
        return []
    return list(dict.fromkeys(issue.text.strip() for issue in review.blocking_issues))


def _decision_delta(run1: RunSide, run2: RunSide) -> DecisionDelta:
    old_confidence = run1.overall_weighted_confidence
    new_confidence = run2.overall_weighted_confidence
    return DecisionDelta(
        old_overall_weighted_confidence=old_confidence,
        new_overall_weighted_confidence=new_confidence,
        confidence_delta=_delta(old_confidence, new_confidence),
        old_decision_label=run1.decision_label,
        new_decision_label=run2.decision_label,
        decision_changed=run1.decision_label != run2.decision_label,
        old_confidence=old_confidence,
        new_confidence=new_confidence,
        old_decision=run1.decision_label,
        new_decision=run2.decision_label,
    )


def _delta(old: float | None, new: float | None) -> float | None:
    # Rounded so 0.7 - 0.6 reads 0.1, not 0.09999999999999998.
    return None if old is None or new is None else round(new - old, 9)
