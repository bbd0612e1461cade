"""Validation of the input idea, shared by the API and the push boundary."""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_IDEA_CHARS = 10_000
MAX_IDEA_SENTENCES = 10
MAX_EXTRA_CONTEXT_CHARS = 50_000
# Deeper JSON is no plausible context and only risks recursion limits further down.
MAX_JSON_DEPTH = 64

_SENTENCE_END = re.compile(r"[.!?]+(?:\s+|$)")
# A str holds code points, so any surrogate in it is a lone one (a JSON pair decodes to one
# code point). Neither NUL nor a lone surrogate can be stored as PostgreSQL text or JSON.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def count_sentences(text: str) -> int:
    """Sentences are runs of text ended by . ! or ? followed by space or the end."""
    return sum(1 for part in _SENTENCE_END.split(text) if part.strip())


def text_problem(text: str, allow_nul: bool = False) -> str | None:
    """Why `text` cannot be stored as text (NUL, lone surrogate), or None when it can."""
    found = (_LONE_SURROGATE if allow_nul else _UNSTORABLE).search(text)
    if found is None:
        return None
    return "a NUL character" if found.group() == "\x00" else "a lone surrogate"


def make_storable(text: str) -> str:
    """`text` with each NUL and lone surrogate replaced by U+FFFD."""
    return _UNSTORABLE.sub("\ufffd", text)


def json_problem(value: Any, allow_nul: bool = False) -> str | None:
    """Why `value` is not plain storable JSON, or None when it is.

    Plain JSON: dicts with string keys, lists, storable strings, finite numbers, booleans and
    None, at most `MAX_JSON_DEPTH` containers deep. `allow_nul` lets NUL pass in strings, for
    JSON that is only inspected, not stored.
    """
    return _json_problem(value, MAX_JSON_DEPTH, allow_nul)


def _json_problem(value: Any, depth_left: int, allow_nul: bool) -> str | None:
    if value is None or isinstance(value, bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else "a non-finite number"
    if isinstance(value, str):
        return text_problem(value, allow_nul)
    if not isinstance(value, dict | list):
        return f"a value of type {type(value).__name__}"
    if depth_left <= 0:
        return f"nesting deeper than {MAX_JSON_DEPTH} levels"
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                return "a key that is not a string"
            problem = text_problem(key, allow_nul)
            if problem is not None:
                return problem
        children = list(value.values())
    else:
        children = value
    for child in children:
        problem = _json_problem(child, depth_left - 1, allow_nul)
        if problem is not None:
            return problem
    return None


def validate_idea(idea: str) -> str:
    """Return the stripped idea or raise ValueError saying what is wrong."""
    problem = text_problem(idea)
    if problem is not None:
        raise ValueError(f"idea must not contain {problem}")
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
    problem = json_problem(extra)
    if problem is not None:
        raise ValueError(f"extra_context must not contain {problem}")
    size = len(extra) if isinstance(extra, str) else len(json.dumps(extra))
    if size > MAX_EXTRA_CONTEXT_CHARS:
        raise ValueError(f"extra_context must be at most {MAX_EXTRA_CONTEXT_CHARS} characters")
    return extra
