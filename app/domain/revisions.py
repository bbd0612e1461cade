"""Revisions of a completed run: what the edits change, and which reviews are worth re-running.

A revision starts from its parent's proposal. `edited_proposal` fields replace the parent's
without an LLM call; `edit_notes` drive one LLM call that revises the (edited) proposal. A
persona is re-run only where the parent's review gave reason to (the reference's rule); the other
reviews are taken over unchanged.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.domain.ideas import json_problem
from app.domain.models import PersonaReview, Proposal
from app.domain.personas import RERUN_CONFIDENCE_THRESHOLD, VETO_PERSONA_ID

MAX_EDITED_PROPOSAL_CHARS = 100_000
MAX_EDIT_NOTES_CHARS = 10_000


class ProposalEdits(BaseModel):
    """Some or all fields of a proposal; the ones given replace the parent's."""

    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(default=None, min_length=1)
    summary: str | None = Field(default=None, min_length=1)
    problem_statement: str | None = Field(default=None, min_length=1)
    proposed_solution: str | None = Field(default=None, min_length=1)
    assumptions: list[str] | None = None
    scope_non_goals: list[str] | None = None

    def apply(self, proposal: Proposal) -> Proposal:
        return proposal.model_copy(update=self.model_dump(exclude_none=True))


@dataclass(frozen=True)
class RevisionEdits:
    """A revision request made explicit: field edits, and notes for the LLM (or None)."""

    fields: ProposalEdits
    notes: str | None


def read_edits(
    edited_proposal: dict[str, Any] | str | None, edit_notes: str | None
) -> RevisionEdits:
    """Validate a revision's edits; ValueError says what is wrong.

    `edited_proposal` is an object of proposal fields, or text. Text laid out as the reference
    web app writes a proposal (`# title`, summary, `## Problem Statement`, ...) is read field by
    field; any other text is a description of the change, so it joins the notes.
    """
    for name, value, limit in (
        ("edited_proposal", edited_proposal, MAX_EDITED_PROPOSAL_CHARS),
        ("edit_notes", edit_notes, MAX_EDIT_NOTES_CHARS),
    ):
        problem = json_problem(value)
        if problem is not None:
            raise ValueError(f"{name} must not contain {problem}")
        size = len(value) if isinstance(value, str) else len(json.dumps(value))
        if size > limit:
            raise ValueError(f"{name} exceeds {limit} characters")
    notes = [edit_notes.strip()] if edit_notes and edit_notes.strip() else []
    if isinstance(edited_proposal, str):
        parsed = parse_proposal_text(edited_proposal)
        if parsed is None:
            if edited_proposal.strip():
                notes.insert(0, edited_proposal.strip())
            fields = ProposalEdits()
        else:
            fields = parsed
    elif isinstance(edited_proposal, dict):
        try:
            fields = ProposalEdits.model_validate(edited_proposal)
        except ValidationError as exc:
            raise ValueError(f"edited_proposal: {_first_error(exc)}") from None
    else:
        fields = ProposalEdits()
    joined = "\n\n".join(notes) or None
    if not fields.model_dump(exclude_none=True) and joined is None:
        raise ValueError("give edited_proposal or edit_notes (or both): neither changes anything")
    return RevisionEdits(fields, joined)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


_SECTIONS = {
    "problem statement": "problem_statement",
    "problem_statement": "problem_statement",
    "proposed solution": "proposed_solution",
    "proposed_solution": "proposed_solution",
    "solution": "proposed_solution",
    "assumptions": "assumptions",
    "scope / non-goals": "scope_non_goals",
    "scope/non-goals": "scope_non_goals",
    "scope non-goals": "scope_non_goals",
    "scope_non_goals": "scope_non_goals",
    "non-goals": "scope_non_goals",
    "summary": "summary",
}
_LIST_FIELDS = {"assumptions", "scope_non_goals"}
_HEADING = re.compile(r"^(#{1,2})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")


def parse_proposal_text(text: str) -> ProposalEdits | None:
    """Fields of a proposal written as markdown (`# title`, summary, `## Section`s).

    None when the text is not laid out that way (no recognised `##` section), or when it has a
    section this does not know: such text is prose about the change, not a proposal.
    """
    title: str | None = None
    current = "summary"
    sections: dict[str, list[str]] = {"summary": []}
    known = 0
    for line in text.splitlines():
        heading = _HEADING.match(line)
        if heading and heading.group(1) == "#" and title is None and known == 0:
            title = heading.group(2).strip() or None
            continue
        if heading and heading.group(1) == "##":
            name = _SECTIONS.get(heading.group(2).strip().lower())
            if name is None:
                return None
            current = name
            sections.setdefault(current, [])
            known += 1
            continue
        sections[current].append(line)
    if known == 0:
        return None
    values: dict[str, Any] = {"title": title}
    for name, lines in sections.items():
        body = "\n".join(lines).strip()
        if name in _LIST_FIELDS:
            items = [_BULLET.sub("", line).strip() for line in body.splitlines()]
            items = [item for item in items if item]
            values[name] = [] if items in ([], ["None"]) else items
        else:
            values[name] = body or None
    return ProposalEdits.model_validate(values)


@dataclass(frozen=True)
class ParentReview:
    """A review of the parent run, and the run whose LLM call produced it."""

    review: PersonaReview
    origin_run_id: str


@dataclass(frozen=True)
class Revision:
    """What a revision run starts from: its parent's proposal and reviews, and the edits."""

    parent_run_id: str
    parent_proposal: Proposal
    parent_reviews: dict[str, ParentReview]
    edits: RevisionEdits


def needs_rerun(review: PersonaReview) -> bool:
    """The reference's rule: low confidence, a blocking issue, or a security concern raised by
    the security guardian."""
    return (
        review.confidence_score < RERUN_CONFIDENCE_THRESHOLD
        or review.blocking_issues_present
        or (review.persona_id == VETO_PERSONA_ID and review.security_concerns_present)
    )
