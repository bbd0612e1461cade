"""The monitoring artifacts the tests read: infra/monitoring/ (log-based metrics, alert
policies, the dashboard), scripts/setup_monitoring.sh that applies them and the runbook,
docs/OPERATIONS.md; each file loaded once."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import yaml

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "infra" / "monitoring"
SCRIPT = ROOT / "scripts" / "setup_monitoring.sh"
RUNBOOK = ROOT / "docs" / "OPERATIONS.md"
PROJECT = "test-project"
SERVICE = "consensus-engine"
# What setup_monitoring.sh replaces in the policies and the dashboard.
PLACEHOLDERS = {"SERVICE_NAME", "SUBSCRIPTION", "HIGH_SUBSCRIPTION", "DLQ_SUBSCRIPTION"}

Json = dict[str, Any]


def load(path: Path) -> Json:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict), f"{path.name} is not a mapping"
    return cast(Json, document)


def _files(kind: str) -> list[Path]:
    return sorted((MONITORING / kind).glob("*.yaml"))


METRIC_FILES = _files("metrics")
POLICY_FILES = _files("policies")
DASHBOARD_FILES = _files("dashboards")
METRICS = {path.stem: load(path) for path in METRIC_FILES}
POLICIES = {path.name: load(path) for path in POLICY_FILES}
(DASHBOARD,) = [load(path) for path in DASHBOARD_FILES]
