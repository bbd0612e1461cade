"""The part of Cloud Logging the monitoring tests stand in for: the LogEntry Cloud Logging makes
of a JSON line the service writes to stdout on Cloud Run, and an evaluator of the Logging query
language (the part our metric filters and the runbook's queries use), with the value and label
extractors of log-based metrics."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from tests.monitoring_artifacts import PROJECT, SERVICE, Json

# --- the service's log lines, as Cloud Logging stores them ------------------------------------

# Fields Cloud Logging takes out of a JSON line into the LogEntry itself; `message` stays in
# jsonPayload.
_ENTRY_FIELDS = {
    "severity",
    "time",
    "timestamp",
    "httpRequest",
    "logging.googleapis.com/trace",
    "logging.googleapis.com/spanId",
    "logging.googleapis.com/trace_sampled",
    "logging.googleapis.com/labels",
    "logging.googleapis.com/insertId",
    "logging.googleapis.com/operation",
    "logging.googleapis.com/sourceLocation",
}


def log_entry(line: Json) -> Json:
    """The LogEntry Cloud Logging makes of one line the service writes to stdout on Cloud Run."""
    return {
        "resource": {
            "type": "cloud_run_revision",
            "labels": {
                "project_id": PROJECT,
                "service_name": SERVICE,
                "revision_name": f"{SERVICE}-00007-xyz",
                "configuration_name": SERVICE,
                "location": "us-central1",
            },
        },
        "logName": f"projects/{PROJECT}/logs/run.googleapis.com%2Fstdout",
        "severity": line.get("severity", "DEFAULT"),
        "jsonPayload": {k: v for k, v in line.items() if k not in _ENTRY_FIELDS},
    }


def event_of(entry: Json) -> str | None:
    return cast(str | None, entry["jsonPayload"].get("lifecycle_event"))


# --- a Logging query language evaluator (the part our filters use) ----------------------------

SEVERITIES = [
    "DEFAULT",
    "DEBUG",
    "INFO",
    "NOTICE",
    "WARNING",
    "ERROR",
    "CRITICAL",
    "ALERT",
    "EMERGENCY",
]
_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<op>>=|<=|!=|=~|!~|[=:<>])
      | (?P<paren>[()])
      | (?P<word>[^\s()"=:<>!]+)
    )""",
    re.VERBOSE,
)
_KEYWORDS = {"AND", "OR", "NOT"}
_MISSING = object()


class FilterSyntaxError(ValueError):
    pass


@dataclass(frozen=True)
class Compare:
    path: str
    op: str
    values: tuple[str, ...]
    quoted: bool


@dataclass(frozen=True)
class Not:
    part: Any


@dataclass(frozen=True)
class All:
    parts: tuple[Any, ...]


@dataclass(frozen=True)
class AnyOf:
    parts: tuple[Any, ...]


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(text):
        if not text[position:].strip():
            break
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise FilterSyntaxError(f"cannot read {text[position:]!r}")
        kind = cast(str, match.lastgroup)
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


class _Parser:
    """Logging query language: adjacent terms and AND join, OR binds tighter than AND (so
    mixing them needs parentheses to mean anything else), NOT negates; a comparison is
    `path op value` or `path op (value OR value ...)`."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, kind: str, text: str | None = None) -> str:
        token = self.peek()
        if token is None or token[0] != kind or (text is not None and token[1] != text):
            raise FilterSyntaxError(f"expected {text or kind} at {token}")
        self.i += 1
        return token[1]

    def at(self, kind: str, text: str) -> bool:
        return self.peek() == (kind, text)

    def parse(self) -> Any:
        expression = self.conjunction()
        if self.peek() is not None:
            raise FilterSyntaxError(f"unexpected {self.peek()}")
        return expression

    def conjunction(self) -> Any:
        parts = [self.disjunction()]
        while self.peek() is not None and not self.at("paren", ")"):
            if self.at("word", "AND"):
                self.i += 1
            parts.append(self.disjunction())
        return parts[0] if len(parts) == 1 else All(tuple(parts))

    def disjunction(self) -> Any:
        parts = [self.unary()]
        while self.at("word", "OR"):
            self.i += 1
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else AnyOf(tuple(parts))

    def unary(self) -> Any:
        if self.at("word", "NOT"):
            self.i += 1
            return Not(self.unary())
        if self.at("paren", "("):
            self.i += 1
            expression = self.conjunction()
            self.take("paren", ")")
            return expression
        path = self.take("word")
        if path in _KEYWORDS:
            raise FilterSyntaxError(f"{path} where a field was expected")
        op = self.take("op")
        if self.at("paren", "("):
            self.i += 1
            values, quoted = [self.value()], True
            while self.at("word", "OR"):
                self.i += 1
                values.append(self.value())
            self.take("paren", ")")
            return Compare(path, op, tuple(v for v, _ in values), all(q for _, q in values))
        value, quoted = self.value()
        return Compare(path, op, (value,), quoted)

    def value(self) -> tuple[str, bool]:
        token = self.peek()
        if token is not None and token[0] == "string":
            self.i += 1
            return json.loads(token[1]), True
        word = self.take("word")
        if word in _KEYWORDS:
            raise FilterSyntaxError(f"{word} where a value was expected")
        return word, False


def parse_filter(text: str) -> Any:
    return _Parser(text).parse()


def _lookup(entry: Json, path: str) -> Any:
    node: Any = entry
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _compare_one(actual: Any, op: str, literal: str, path: str) -> bool:
    if actual is _MISSING or actual is None:
        return False
    if op == ":":
        return literal == "*" or literal.lower() in _text(actual).lower()
    if op in ("=~", "!~"):
        found = re.search(literal, _text(actual)) is not None
        return found if op == "=~" else not found
    left, right = number(actual), number(literal)
    if path == "severity":
        left, right = SEVERITIES.index(_text(actual)), SEVERITIES.index(literal)
    if left is None or right is None:
        left_text, right_text = _text(actual), literal
        return {
            "=": left_text == right_text,
            "!=": left_text != right_text,
            "<": left_text < right_text,
            "<=": left_text <= right_text,
            ">": left_text > right_text,
            ">=": left_text >= right_text,
        }[op]
    return {
        "=": left == right,
        "!=": left != right,
        "<": left < right,
        "<=": left <= right,
        ">": left > right,
        ">=": left >= right,
    }[op]


def matches(expression: Any, entry: Json) -> bool:
    if isinstance(expression, All):
        return all(matches(part, entry) for part in expression.parts)
    if isinstance(expression, AnyOf):
        return any(matches(part, entry) for part in expression.parts)
    if isinstance(expression, Not):
        return not matches(expression.part, entry)
    actual = _lookup(entry, expression.path)
    return any(_compare_one(actual, expression.op, v, expression.path) for v in expression.values)


def comparisons(expression: Any) -> Iterator[Compare]:
    if isinstance(expression, All | AnyOf):
        for part in expression.parts:
            yield from comparisons(part)
    elif isinstance(expression, Not):
        yield from comparisons(expression.part)
    else:
        yield expression


def selected_events(expression: Any) -> set[str]:
    return {
        value
        for compare in comparisons(expression)
        if compare.path == "jsonPayload.lifecycle_event" and compare.op == "="
        for value in compare.values
    }


def payload_fields(text: str) -> set[str]:
    return set(re.findall(r"\bjsonPayload\.(\w+)", text))


_EXTRACT = re.compile(r"EXTRACT\((?P<path>[\w.]+)\)")
_REGEXP_EXTRACT = re.compile(r'REGEXP_EXTRACT\((?P<path>[\w.]+),\s*(?P<regex>"(?:[^"\\]|\\.)*")\)')


def extractor(text: str) -> Callable[[Json], Any]:
    """What a value or label extractor yields for a LogEntry (None when nothing)."""
    if match := _EXTRACT.fullmatch(text):
        path = match["path"]
        return lambda entry: None if (v := _lookup(entry, path)) is _MISSING else v
    if match := _REGEXP_EXTRACT.fullmatch(text):
        path, regex = match["path"], re.compile(json.loads(match["regex"]))
        assert regex.groups == 1, f"{text}: one capturing group"

        def regexp(entry: Json) -> Any:
            value = _lookup(entry, path)
            found = None if value in (_MISSING, None) else regex.search(_text(value))
            return found.group(1) if found else None

        return regexp
    raise AssertionError(f"not an extractor this test understands: {text}")
