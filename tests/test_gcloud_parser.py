"""The gcloud parser check itself (tests/gcloud_parser.py): it catches what gcloud refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gcloud_parser import GcloudParse, gcloud_parser
from tests.monitoring_artifacts import POLICY_FILES


@pytest.fixture(scope="session")
def gcloud_parse(tmp_path_factory: pytest.TempPathFactory) -> GcloudParse:
    return gcloud_parser(tmp_path_factory.mktemp("gcloud-config"))


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
