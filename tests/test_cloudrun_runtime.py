"""What the Cloud Run manifest makes the app do at run time: no background timer on
request-based CPU, how the Cloud SQL connector dials, and the connection budget."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from app.main import create_app
from app.settings import Settings
from app.store.db import build_engine
from app.sweep import Sweeper

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "infra" / "cloudrun" / "service.yaml"
MANIFEST_README = ROOT / "infra" / "cloudrun" / "README.md"
SETUP_GCP = ROOT / "scripts" / "setup_gcp.sh"

# The connections besides the service's pools in the README's budget: the migration job,
# admin headroom and Cloud SQL's reserved superuser connections.
MIGRATION_CONNECTIONS = 1
ADMIN_HEADROOM = 10
SUPERUSER_RESERVED = 3
# Old and new revision both up while a rollout moves traffic.
REVISIONS_DURING_ROLLOUT = 2
# Per instance, beside its pool: the run events' LISTEN connection while a stream is open.
LISTENER_CONNECTIONS = 1


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    return loaded


def _env(manifest: dict[str, Any]) -> dict[str, str]:
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


def _revision_annotations(manifest: dict[str, Any]) -> dict[str, str]:
    annotations: dict[str, str] = manifest["spec"]["template"]["metadata"]["annotations"]
    return annotations


def _embedded(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'engine.db'}",
        "llm_provider": "offline",
        "push_auth": "none",
        "log_level": "WARNING",
        **overrides,
    }
    return Settings(_env_file=None, **values)


async def _timer_started(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Whether the app's lifespan starts the in-process sweep timer."""
    intervals: list[float] = []

    async def record(self: Sweeper, interval: float) -> None:
        intervals.append(interval)

    monkeypatch.setattr(Sweeper, "run_forever", record)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await asyncio.sleep(0.05)  # a started task gets to run
    return bool(intervals)


# --- point 4: no work outside requests on Cloud Run ------------------------------------------


def test_manifest_turns_the_sweep_timer_off(manifest: dict[str, Any]) -> None:
    value = _env(manifest)["SWEEP_INTERVAL_SECONDS"]
    assert Settings(_env_file=None, sweep_interval_seconds=value).sweep_interval_seconds == 0
    # Cloud Scheduler's POST /tasks/sweep is the one trigger instead (scripts/setup_gcp.sh).
    assert "/tasks/sweep" in SETUP_GCP.read_text()
    assert _revision_annotations(manifest)["run.googleapis.com/cpu-throttling"] == "true"


async def test_no_timer_task_with_the_manifest_setting(
    manifest: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    interval = _env(manifest)["SWEEP_INTERVAL_SECONDS"]
    settings = _embedded(tmp_path, sweep_interval_seconds=interval)
    assert not await _timer_started(settings, monkeypatch)


async def test_the_embedded_default_keeps_its_timer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _embedded(tmp_path)
    assert settings.sweep_interval_seconds == 60
    assert await _timer_started(settings, monkeypatch)


def test_negative_sweep_interval_is_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, sweep_interval_seconds=-1)


def test_readme_says_the_timer_is_off_on_cloud_run() -> None:
    text = " ".join(MANIFEST_README.read_text().split())
    assert "`SWEEP_INTERVAL_SECONDS=0`" in text
    assert "the one trigger here" in text


# --- point 7: Cloud SQL through the connector --------------------------------------------------


def test_manifest_has_no_cloudsql_instances_annotation(manifest: dict[str, Any]) -> None:
    assert "run.googleapis.com/cloudsql-instances" not in _revision_annotations(manifest)
    assert "run.googleapis.com/cloudsql-instances" not in manifest["metadata"]["annotations"]
    env = _env(manifest)
    assert env["USE_CLOUD_SQL_CONNECTOR"] == "true"
    assert Settings(_env_file=None, db_ip_type=env["DB_IP_TYPE"]).db_ip_type == "public"


def test_manifest_comments_give_the_private_path_its_vpc_egress() -> None:
    text = MANIFEST.read_text()
    assert "run.googleapis.com/network-interfaces" in text
    assert "run.googleapis.com/vpc-access-egress: private-ranges-only" in text


def test_db_ip_type_is_validated() -> None:
    assert Settings(_env_file=None).db_ip_type == "public"
    for value in ("public", "private", "psc"):
        assert Settings(_env_file=None, db_ip_type=value).db_ip_type == value
    with pytest.raises(ValidationError):
        Settings(_env_file=None, db_ip_type="vpc")


class _Refused(Exception):
    pass


class FakeConnector:
    """Records what the engine asks the Cloud SQL connector for, and refuses to connect."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    async def connect_async(
        self, instance_connection_string: str, driver: str, **kwargs: Any
    ) -> Any:
        self.calls.append((instance_connection_string, driver, kwargs))
        raise _Refused

    async def close_async(self) -> None:
        return None


@pytest.mark.parametrize("ip_type", ["public", "private", "psc"])
async def test_the_connector_receives_the_ip_type(ip_type: str) -> None:
    settings = Settings(
        _env_file=None,
        use_cloud_sql_connector=True,
        db_instance_connection_name="proj:europe-west1:db",
        db_iam_auth=True,
        db_user="receiver@proj.iam",
        db_ip_type=ip_type,
    )
    connector = FakeConnector()
    engine = build_engine(settings, connector)
    try:
        with pytest.raises(_Refused):
            async with engine.connect():
                pass
    finally:
        await engine.dispose()
    ((instance, driver, options),) = connector.calls
    assert (instance, driver) == ("proj:europe-west1:db", "asyncpg")
    assert options["ip_type"] == ip_type
    assert options["enable_iam_auth"] is True


# --- point 8: the connection budget -----------------------------------------------------------


def _budget(manifest: dict[str, Any]) -> tuple[int, int]:
    """(the service's connections during a rollout, the whole budget)."""
    max_scale = int(_revision_annotations(manifest)["autoscaling.knative.dev/maxScale"])
    defaults = Settings(_env_file=None)
    env = _env(manifest)
    # The manifest states the pool sizes it relies on; they are the settings' defaults.
    assert int(env["DB_POOL_SIZE"]) == defaults.db_pool_size
    assert int(env["DB_MAX_OVERFLOW"]) == defaults.db_max_overflow
    per_instance = defaults.db_pool_size + defaults.db_max_overflow + LISTENER_CONNECTIONS
    service = max_scale * per_instance * REVISIONS_DURING_ROLLOUT
    return service, service + MIGRATION_CONNECTIONS + ADMIN_HEADROOM + SUPERUSER_RESERVED


def test_readme_states_the_connection_budget(manifest: dict[str, Any]) -> None:
    service, budget = _budget(manifest)
    text = MANIFEST_README.read_text()
    section = text[text.index("**Connection budget**") :]
    section = section[: section.index("**budget**") + 200]
    rows = re.findall(r"^\s*\|(.*)\|\s*(\d+)\s*\|\s*$", section, re.MULTILINE)
    figures = [int(figure) for _, figure in rows]
    assert figures == [service, MIGRATION_CONNECTIONS, ADMIN_HEADROOM, SUPERUSER_RESERVED]
    (stated,) = re.findall(r"\|\s*\*\*budget\*\*\s*\|\s*\*\*(\d+)\*\*\s*\|", section)
    assert int(stated) == budget == sum(figures)


def test_max_connections_matches_the_budget(manifest: dict[str, Any]) -> None:
    _, budget = _budget(manifest)
    readme = MANIFEST_README.read_text()
    (created,) = re.findall(r"--database-flags=\S*max_connections=(\d+)", readme)
    (setup_default,) = re.findall(
        r'^MAX_CONNECTIONS="\$\{MAX_CONNECTIONS:-(\d+)\}"$', SETUP_GCP.read_text(), re.MULTILINE
    )
    assert int(created) == int(setup_default) >= budget
    # The tier step 1 creates (3.75 GB) defaults to 100, below the budget: the flag is needed.
    assert "--tier=db-custom-1-3840" in readme
    assert budget > 100
    assert f"max_connections={created}" in " ".join(readme.split())
