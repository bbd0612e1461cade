"""A deterministic, clearly labelled stand-in for the LLM: for the embedded default and demos."""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import Any

from app.domain.llm import LLMRequest, LLMResult, T
from app.domain.models import Proposal, ReviewContent, RevisedProposal, TokenUsage

OFFLINE_MODEL = "offline"
_LABEL = "[offline]"


class OfflineProvider:
    """Derives every answer from a hash of the request, so the same input gives the same run."""

    def slot(self) -> AbstractAsyncContextManager[None]:
        """No limit: nothing is sent anywhere."""
        return nullcontext()

    async def generate(self, request: LLMRequest[T]) -> LLMResult[T]:
        digest = hashlib.sha256(f"{request.step}\n{request.input}".encode()).digest()
        fields: dict[str, Any]
        if request.output_type is Proposal:
            fields = _proposal(request.input)
        elif request.output_type is RevisedProposal:
            fields = _revised(request.input)
        elif request.output_type is ReviewContent:
            fields = _review(request.step, digest)
        else:
            raise TypeError(f"offline provider cannot produce {request.output_type.__name__}")
        output = request.output_type.model_validate(fields)
        words = len(request.input.split())
        usage = TokenUsage(words, 0, words)
        return LLMResult(output=output, usage=usage, model=OFFLINE_MODEL)


def _proposal(text: str) -> dict[str, Any]:
    idea = text.split("\n", 2)[1] if "\n" in text else text
    head = idea.split(".")[0].strip()[:80] or "Untitled idea"
    return {
        "title": f"{_LABEL} {head}",
        "summary": f"{_LABEL} Offline expansion of: {idea[:400]}",
        "problem_statement": f"{_LABEL} The problem the idea addresses, as stated by its author.",
        "proposed_solution": f"{_LABEL} Build what the idea describes, smallest useful version.",
        "assumptions": [f"{_LABEL} Users want this", f"{_LABEL} It can be built with known tools"],
        "scope_non_goals": [f"{_LABEL} Anything beyond the first release"],
    }


def _data_block(text: str, name: str) -> str:
    match = re.search(rf'<data name="{name}">\n(.*?)\n</data>', text, re.DOTALL)
    return match.group(1) if match else ""


def _revised(text: str) -> dict[str, Any]:
    """The proposal in the request, its summary saying which notes it was revised along."""
    fields: dict[str, Any] = json.loads(_data_block(text, "proposal"))
    notes = _data_block(text, "edit_notes").strip()
    fields["summary"] = f"{fields['summary']} {_LABEL} Revised along the notes: {notes[:300]}"
    return fields


def _review(step: str, digest: bytes) -> dict[str, Any]:
    score = round(0.62 + (digest[0] / 255) * 0.33, 2)
    blocking = digest[1] < 26  # about one review in ten raises a blocking issue
    return {
        "confidence_score": score,
        "strengths": [f"{_LABEL} {step}: clear user value"],
        "concerns": [
            {"text": f"{_LABEL} {step}: needs a measurable goal", "is_blocking": blocking}
        ],
        "blocking_issues": (
            [{"text": f"{_LABEL} {step}: unresolved risk", "security_critical": False}]
            if blocking
            else []
        ),
        "recommendations": [f"{_LABEL} {step}: start with a small pilot"],
        "estimated_effort": ("small", "medium", "large")[digest[2] % 3],
        "dependency_risks": [],
    }
