"""Settings: defaults, derived values, and start-up refusal with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from app.domain.pricing import DEFAULT_PRICES, ModelPrice
from app.settings import Settings, describe_error


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


def test_embedded_defaults() -> None:
    s = settings()
    assert s.effective_llm_provider == "offline"
    assert s.is_sqlite and s.auto_migrate
    assert s.effective_push_auth == "none"
    assert s.worker_ack_deadline_seconds == 600
    assert s.effective_push_deadline_seconds == 570
    assert (s.max_retries_per_persona, s.retry_initial_backoff_seconds) == (3, 1.0)


def test_plain_postgres_url_is_mapped_to_asyncpg() -> None:
    s = settings(database_url="postgres://u:p@db:5432/x")
    assert s.sqlalchemy_url == "postgresql+asyncpg://u:p@db:5432/x"
    assert not s.auto_migrate


def test_db_fields_build_a_url() -> None:
    s = settings(db_host="10.0.0.5", db_user="app", db_password="p@ss", db_name="ce")
    assert s.sqlalchemy_url == "postgresql+asyncpg://app:p%40ss@10.0.0.5:5432/ce"


def test_service_accounts_are_comma_separated() -> None:
    s = settings(push_service_accounts="a@x.iam.gserviceaccount.com, b@x.iam.gserviceaccount.com")
    assert s.push_service_accounts == [
        "a@x.iam.gserviceaccount.com",
        "b@x.iam.gserviceaccount.com",
    ]


def test_cors_origins_are_comma_separated() -> None:
    s = settings(cors_origins="http://localhost:5173, https://app.example.com")
    assert s.cors_origins == ["http://localhost:5173", "https://app.example.com"]
    assert settings().cors_origins == []


def test_high_priority_topic_defaults_to_the_jobs_topic_plus_high() -> None:
    assert settings().effective_pubsub_high_priority_topic == "consensus-engine-jobs-high"
    assert settings(pubsub_topic="jobs").effective_pubsub_high_priority_topic == "jobs-high"
    # An empty value (a rendered but unset variable) means the default too.
    assert settings(pubsub_high_priority_topic="").effective_pubsub_high_priority_topic == (
        "consensus-engine-jobs-high"
    )
    chosen = settings(pubsub_high_priority_topic="urgent-jobs")
    assert chosen.effective_pubsub_high_priority_topic == "urgent-jobs"


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"env": "production", "openai_api_key": "k", "push_audience": "a"}, "PUSH_SERVICE"),
        ({"env": "production", "push_audience": "a", "push_service_accounts": "x"}, "OPENAI"),
        ({"env": "production", "llm_provider": "offline"}, "offline"),
        (
            {
                "env": "production",
                "openai_api_key": "k",
                "push_auth": "none",
                "push_service_accounts": "x",
            },
            "PUSH_AUTH=none",
        ),
        (
            {
                "env": "production",
                "openai_api_key": "k",
                "push_audience": "a",
                "push_service_accounts": "x",
            },
            "SQLite",
        ),
        ({"push_deadline_seconds": 600}, "PUSH_DEADLINE_SECONDS"),
        ({"push_auth": "oidc"}, "PUSH_AUDIENCE"),
        ({"database_url": "mysql://x"}, "DATABASE_URL"),
        ({"cors_origins": "localhost:5173"}, "CORS_ORIGINS"),
        ({"cors_origins": "https://app.example.com/path"}, "CORS_ORIGINS"),
        ({"pubsub_high_priority_topic": "jobs high"}, "PUBSUB_HIGH_PRIORITY_TOPIC"),
        ({"pubsub_high_priority_topic": "goog-jobs"}, "PUBSUB_HIGH_PRIORITY_TOPIC"),
        ({"pubsub_high_priority_topic": "consensus-engine-jobs"}, "must differ"),
        ({"pubsub_topic": "j"}, "PUBSUB_TOPIC"),
        ({"pubsub_topic": "j" * 252}, "PUBSUB_HIGH_PRIORITY_TOPIC"),
    ],
)
def test_invalid_combinations_are_refused(values: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        settings(**values)
    assert needle in describe_error(info.value)


def test_invalid_value_stops_startup_with_one_line_naming_the_variable() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "DATABASE"))}
    env["WORKER_STEP_TIMEOUT_SECONDS"] = "soon"
    result = subprocess.run(
        [sys.executable, "-c", "import app.main as m; m.app"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "WORKER_STEP_TIMEOUT_SECONDS" in lines[0]


def test_llm_prices_extend_and_override_the_defaults() -> None:
    assert settings().llm_prices == DEFAULT_PRICES
    s = settings(
        llm_prices='{"house-model": {"input_per_1m_usd": 0.5, "output_per_1m_usd": 1.5}, '
        '"gpt-5.1": {"input_per_1m_usd": 2, "output_per_1m_usd": 20}}'
    )
    assert s.llm_prices["house-model"] == ModelPrice(input_per_1m_usd=0.5, output_per_1m_usd=1.5)
    assert s.llm_prices["gpt-5.1"] == ModelPrice(input_per_1m_usd=2, output_per_1m_usd=20)
    assert s.llm_prices["gpt-5-mini"] == DEFAULT_PRICES["gpt-5-mini"]
    assert settings().daily_budget_usd is None
    assert settings(daily_budget_usd="25").daily_budget_usd == 25.0


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"llm_prices": "gpt-5.1=1.25"}, "LLM_PRICES: must be JSON like"),
        ({"llm_prices": '{"m": {"input_per_1m_usd": -1, "output_per_1m_usd": 1}}'}, "LLM_PRICES"),
        ({"llm_prices": '{"m": {"input_per_1m_usd": 1}}'}, "OUTPUT_PER_1M_USD"),
        ({"llm_prices": '{"m": {"input": 1, "output": 1}}'}, "LLM_PRICES"),
        ({"llm_prices": '{" ": {"input_per_1m_usd": 1, "output_per_1m_usd": 1}}'}, "empty"),
        ({"daily_budget_usd": "0"}, "DAILY_BUDGET_USD"),
        ({"daily_budget_usd": "-5"}, "DAILY_BUDGET_USD"),
        ({"daily_budget_usd": "nan"}, "DAILY_BUDGET_USD"),
    ],
)
def test_invalid_prices_and_budgets_are_refused(values: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        settings(**values)
    assert needle in describe_error(info.value)


# --- /v1 token audiences (issue 12, point 2) ------------------------------------------------

GCLOUD_AUDIENCE = "32555940559.apps.googleusercontent.com"
SERVICE_URL = "https://consensus-engine-123456789.europe-west1.run.app"


def _production_api(**values: Any) -> dict[str, Any]:
    """Production with PUSH_AUTH=oidc, so the app guards /v1 itself (API_AUTH=oidc)."""
    return {
        "env": "production",
        "openai_api_key": "sk-x",
        "database_url": "postgresql://db/x",
        "pubsub_project_id": "p",
        "push_audience": "consensus-engine-pubsub-push",
        "push_service_accounts": "pusher@p.iam.gserviceaccount.com",
        "api_allowed_principals": "ops@example.com",
        **values,
    }


def test_production_api_without_a_service_audience_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        settings(**_production_api())
    line = describe_error(info.value)
    assert "API_AUDIENCES" in line and "service URL" in line
    assert "\n" not in line


@pytest.mark.parametrize("env", ["production", "development"])
def test_gcloud_client_id_alone_is_refused_unless_opted_in(env: str) -> None:
    with pytest.raises(ValidationError) as info:
        settings(**_production_api(env=env, api_auth="oidc", api_audiences=GCLOUD_AUDIENCE))
    assert "API_ALLOW_GCLOUD_AUDIENCE" in describe_error(info.value)
    opted_in = settings(**_production_api(env=env, api_auth="oidc", api_allow_gcloud_audience=True))
    assert opted_in.effective_api_audiences == [GCLOUD_AUDIENCE]


def test_a_service_audience_is_accepted_without_gcloud_s() -> None:
    service = settings(**_production_api(api_audiences=SERVICE_URL))
    assert service.effective_api_audiences == [SERVICE_URL]
    both = settings(
        **_production_api(
            api_audiences=f"{SERVICE_URL},{GCLOUD_AUDIENCE}", api_allow_gcloud_audience=True
        )
    )
    assert both.effective_api_audiences == [SERVICE_URL, GCLOUD_AUDIENCE]


def test_behind_cloud_run_iam_the_app_needs_no_api_audience() -> None:
    # API_AUTH=none there: Cloud Run's invoker check judges the token's audience.
    behind_iam = settings(**_production_api(push_auth="cloud-run-iam"))
    assert behind_iam.effective_api_auth == "none"


def test_production_without_a_service_audience_stops_startup_with_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "PUSH_", "DATABASE"))}
    env.update({key.upper(): str(value) for key, value in _production_api().items()})
    result = subprocess.run(
        [sys.executable, "-c", "import app.main as m; m.app"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "API_AUDIENCES" in lines[0]
