"""scripts/setup_monitoring.sh, checked without a Google Cloud project.

- The script against a fake gcloud that keeps what it is given, like a project: the first run
  creates, the second updates, with the notification channels and names given and
  scripts/setup_gcp.sh's defaults; it refuses what would break a filter or leave policies
  ambiguous, and --dry-run only looks.
- gcloud's own parser (where the Cloud SDK is installed) accepts every command the script runs,
  and gcloud's own conversion turns each file into the API message it would send, with no field
  the API does not know.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest

from tests.gcloud_parser import GcloudParse, gcloud_parser, refused
from tests.monitoring_artifacts import (
    DASHBOARD_FILES,
    METRICS,
    POLICIES,
    PROJECT,
    ROOT,
    Json,
)


@pytest.fixture(scope="session")
def gcloud_parse(tmp_path_factory: pytest.TempPathFactory) -> GcloudParse:
    return gcloud_parser(tmp_path_factory.mktemp("gcloud-config"))


CHANNEL = "projects/test-project/notificationChannels/1234567890"


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


# --- gcloud's own parser (tests/gcloud_parser.py) over every command the script runs --------


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
    assert not refused(results), "\n".join(refused(results))

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
