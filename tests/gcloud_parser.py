"""gcloud's own parser, for checking gcloud command lines without a Google Cloud project.

`gcloud_parser(home)` makes a function (a test module's session fixture, typically) that takes
command lines, without the leading `gcloud`, and answers for each whether gcloud's parser
accepts it and, for the commands that send a file (log-based metrics, alert policies,
dashboards), which fields of the API message gcloud would make of the file it does not know.
`refused` words the rejections for an assertion message. Where the Cloud SDK is not installed,
`gcloud_parser` skips the test asking for it (fails it in CI).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

Json = dict[str, Any]
IN_CI = os.environ.get("CI", "").lower() == "true"


def skip_or_fail(message: str) -> None:
    """Skip a test whose tool is missing here; in CI, where it must be installed, fail it."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(f"!!! SKIPPED: {message}")


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


def cloud_sdk() -> tuple[str, Path] | None:
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


def gcloud_parser(home: Path) -> GcloudParse:
    """A function parsing command lines with gcloud (`home`: an empty directory for its
    configuration): one result per line, with `ok`, `command` (its dotted path), `error` and
    `stderr` when refused, `message` and `unknown_fields` when the command sends a file.

    Skips the test asking for it where the Cloud SDK is not installed (fails it in CI)."""
    sdk = cloud_sdk()
    if sdk is None:
        skip_or_fail("the Cloud SDK (gcloud) is not installed: its parser cannot check commands")
    python, lib = cast(tuple[str, Path], sdk)
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


def refused(results: list[Json]) -> list[str]:
    """The command lines gcloud refused, each with its error."""
    return [
        f"{shlex.join(['gcloud', *r['argv']])}\n    {r.get('error')}: {r['stderr'].strip()}"
        for r in results
        if not r["ok"]
    ]
