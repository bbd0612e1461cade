"""Monitoring as code, infra/monitoring/, checked without a Google Cloud project.

- The log-based metrics read what the service logs: each metric's filter and extractors are
  evaluated against the JSON lines the service writes to stdout in production, captured from
  real runs (tests/captured_logs.py: one app start, a scenario that writes every event a metric
  selects). A filter must select lines, every field it or its value extractor names must be on
  every line it selects, and every field a label extractor names on the lines of an event it
  selects; an event a metric selects that the capture did not write fails the check.
- Every metric a policy or the dashboard reads is defined, with the labels they use, aligned and
  reduced as its kind and type allow; the thresholds are the deployment guide's; each policy's
  documentation links a section of the runbook.
- What scripts/setup_monitoring.sh reads from the files: one quoted displayName line each, and
  only the placeholders it declares.

Elsewhere: scripts/setup_monitoring.sh in tests/test_setup_monitoring.py, the runbook in
tests/test_runbook.py, gcloud's own parser in tests/gcloud_parser.py (checked itself in
tests/test_gcloud_parser.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest

from tests import captured_logs
from tests.fakes.openai_server import FakeOpenAI
from tests.logging_query import (
    SEVERITIES,
    FilterSyntaxError,
    event_of,
    extractor,
    log_entry,
    matches,
    number,
    parse_filter,
    payload_fields,
    selected_events,
)
from tests.monitoring_artifacts import (
    DASHBOARD,
    DASHBOARD_FILES,
    METRIC_FILES,
    METRICS,
    PLACEHOLDERS,
    POLICIES,
    POLICY_FILES,
    RUNBOOK,
    SCRIPT,
    Json,
    load,
)

USER_METRIC = "logging.googleapis.com/user/"
CAPTURED = "the captured lines (tests/captured_logs.py)"


# --- the service's log lines, captured ------------------------------------------------------------


@pytest.fixture(scope="session")
async def captured_lines(pg_url: str, fake_openai: FakeOpenAI) -> list[Json]:
    """The service's production log lines, captured from real runs (tests/captured_logs.py)."""
    return await captured_logs.captured_lines(pg_url, fake_openai)


@pytest.fixture(scope="module")
def entries(captured_lines: list[Json]) -> list[Json]:
    """The LogEntry Cloud Logging would make of each captured line."""
    return [log_entry(line) for line in captured_lines]


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


def test_captured_lines_are_the_services_production_json(captured_lines: list[Json]) -> None:
    for line in captured_lines:
        assert {"severity", "message", "time"} <= line.keys(), line
        assert line["severity"] in SEVERITIES, line


@pytest.mark.parametrize("event", sorted(CONTRACT))
def test_captured_lines_follow_the_field_contract(event: str, captured_lines: list[Json]) -> None:
    lines = [line for line in captured_lines if line.get("lifecycle_event") == event]
    assert lines, f"no {event} line in {CAPTURED}: the capture scenario must write one"
    for line in lines:
        missing = CONTRACT[event] - line.keys()
        assert not missing, f"{event} line without {sorted(missing)}: {line}"
        assert isinstance(line["elapsed_time"], int | float) and line["elapsed_time"] >= 0
        assert line["cost_usd"] is None or isinstance(line["cost_usd"], int | float)


# --- a Logging query language evaluator (tests/logging_query.py) ---------------------------------


def test_filter_evaluator_reads_logging_queries() -> None:
    entry = log_entry({"severity": "ERROR", "lifecycle_event": "job_failed", "cost_usd": None})
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
    logged = {event_of(entry) for entry in entries}
    assert events <= logged, (
        f"no {sorted(events - logged)} line in {CAPTURED}: the capture scenario must write one"
    )
    selected = [entry for entry in entries if matches(query, entry)]
    assert selected, f"the filter selects none of {CAPTURED}"
    assert {event_of(entry) for entry in selected} <= events

    value_text = metric.get("valueExtractor", "")
    for field in payload_fields(metric["filter"]) | payload_fields(value_text):
        without = [e["jsonPayload"] for e in selected if field not in e["jsonPayload"]]
        assert not without, f"jsonPayload.{field} missing on selected lines: {without}"
    if value_text:
        values = [extractor(value_text)(entry) for entry in selected]
        bad = [v for v in values if number(v) is None or not math.isfinite(float(v))]
        assert not bad, f"{value_text} yields no number on some selected lines: {bad}"

    for label, text in metric.get("labelExtractors", {}).items():
        (field,) = payload_fields(text)
        # Present on every selected line of at least one event (the decision is on
        # job_completed only, say), and yielding a value somewhere.
        assert any(
            all(field in e["jsonPayload"] for e in selected if event_of(e) == event)
            and any(event_of(e) == event for e in selected)
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
    steps = [e for e in entries if event_of(e) in ("step_completed", "step_failed")]
    unknown = [e for e in steps if e["jsonPayload"]["cost_usd"] is None]
    free = [e for e in steps if e["jsonPayload"]["cost_usd"] == 0]
    assert unknown and free, "the capture has a model without a price and a step without a call"
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


# --- what scripts/setup_monitoring.sh reads from the files ------------------------------------


def test_display_names_are_one_quoted_line_the_script_can_read() -> None:
    names = []
    for path in POLICY_FILES + DASHBOARD_FILES:
        lines = [line for line in path.read_text().splitlines() if line.startswith("displayName")]
        assert len(lines) == 1, path.name
        match = re.fullmatch(r'displayName: "([^"\\]+)"', lines[0])
        assert match, f"{path.name}: displayName on one line, in double quotes"
        assert match.group(1) == load(path)["displayName"]
        names.append(match.group(1))
    assert len(names) == len(set(names))


def test_placeholders_are_the_scripts() -> None:
    for path in METRIC_FILES + POLICY_FILES + DASHBOARD_FILES:
        used = set(re.findall(r"\$\{([A-Z_]+)\}", path.read_text()))
        assert used <= PLACEHOLDERS, path.name
    assert re.search(r"^PLACEHOLDERS=\((.*)\)$", SCRIPT.read_text(), re.MULTILINE)
    declared = re.search(r"^PLACEHOLDERS=\((.*)\)$", SCRIPT.read_text(), re.MULTILINE)
    assert declared and set(declared.group(1).split()) == PLACEHOLDERS
