"""Validation of the input idea, shared by the API and the push boundary."""

from __future__ import annotations

import json
import re
from typing import Any

MAX_IDEA_CHARS = 10_000
MAX_IDEA_SENTENCES = 10
MAX_EXTRA_CONTEXT_CHARS = 50_000

_SENTENCE_END = re.compile(r"[.!?]+(?:\s+|$)")


def count_sentences(text: str) -> int:
    """Sentences are runs of text ended by . ! or ? followed by space or the end."""
    return sum(1 for part in _SENTENCE_END.split(text) if part.strip())


def validate_idea(idea: str) -> str:
    """Return the stripped idea or raise ValueError saying what is wrong."""
    stripped = idea.strip()
    if not stripped:
        raise ValueError("idea must not be empty")
    if len(stripped) > MAX_IDEA_CHARS:
        raise ValueError(f"idea must be at most {MAX_IDEA_CHARS} characters")
    sentences = count_sentences(stripped)
    if sentences > MAX_IDEA_SENTENCES:
        raise ValueError(f"idea must be at most {MAX_IDEA_SENTENCES} sentences, got {sentences}")
    return stripped


def validate_extra_context(extra: Any) -> str | dict[str, Any] | None:
    """`extra_context` is a string or an object, at most 50 000 characters serialised."""
    if extra is None:
        return None
    if not isinstance(extra, str | dict):
        raise ValueError("extra_context must be a string or an object")
    size = len(extra) if isinstance(extra, str) else len(json.dumps(extra))
    if size > MAX_EXTRA_CONTEXT_CHARS:
        raise ValueError(f"extra_context must be at most {MAX_EXTRA_CONTEXT_CHARS} characters")
    return extra
