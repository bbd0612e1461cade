"""Every setting of the service, read from the environment (and `.env`) in one place."""

from __future__ import annotations

import json
import re
import sys
from functools import lru_cache
from typing import Annotated, Literal
from urllib.parse import quote_plus

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.domain.pricing import DEFAULT_PRICES, ModelPrice

GOOGLE_V1_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
# The `aud` of `gcloud auth print-identity-token` for a user account (gcloud's OAuth client):
# shared by every service, so a token minted for anything else would be replayable on /v1.
GCLOUD_CLI_AUDIENCE = "32555940559.apps.googleusercontent.com"
# IAP's signing keys, ES256 public keys as {key id: PEM}.
IAP_CERTS_URL = "https://www.gstatic.com/iap/verify/public_key"
EMBEDDED_DATABASE_URL = "sqlite+aiosqlite:///./consensus_engine.db"
# scheme://host[:port], what a browser sends as Origin.
_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?")
# Left between the push deadline and Pub/Sub's ack deadline so the 503 reaches Pub/Sub in time.
PUSH_DEADLINE_MARGIN_SECONDS = 30.0
# Pub/Sub's rule for topic ids: 3..255 characters, a letter first, then letters, digits and
# - _ . ~ + %; never starting with "goog".
_TOPIC_ID = re.compile(r"(?!goog)[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}")
# The high-priority topic when PUBSUB_HIGH_PRIORITY_TOPIC is unset: PUBSUB_TOPIC plus this.
HIGH_PRIORITY_TOPIC_SUFFIX = "-high"


class Settings(BaseSettings):
    """Service configuration; names match the environment variables (case-insensitive)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    env: Literal["development", "production", "testing"] = "development"
    log_level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # LLM
    llm_provider: Literal["openai", "offline"] | None = None
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    openai_model: str = "gpt-5.1"
    expand_model: str | None = None
    expand_temperature: float = Field(0.7, ge=0.0, le=2.0)
    review_model: str | None = None
    review_temperature: float = Field(0.2, ge=0.0, le=2.0)
    llm_max_concurrency: int = Field(500, ge=1, le=5000)
    max_retries_per_persona: int = Field(3, ge=0, le=20)
    retry_initial_backoff_seconds: float = Field(1.0, ge=0.0, le=600.0)
    retry_backoff_multiplier: float = Field(2.0, ge=1.0, le=10.0)
    retry_max_backoff_seconds: float = Field(60.0, gt=0.0, le=3600.0)

    # Cost: US dollars per million tokens by model, merged over the defaults
    # (app/domain/pricing.py), e.g. LLM_PRICES='{"my-model": {"input_per_1m_usd": 0.5,
    # "output_per_1m_usd": 1.5}}'; a model without a price costs "unknown" (null).
    llm_prices: Annotated[dict[str, ModelPrice], NoDecode] = Field(
        default_factory=lambda: dict(DEFAULT_PRICES)
    )
    # Spend per UTC day, summed in the database over every instance: once reached, runs not yet
    # started are deferred to the next day; runs in flight finish. Unset: no budget.
    daily_budget_usd: float | None = Field(None, gt=0.0, allow_inf_nan=False)

    # Database
    database_url: str | None = None
    db_host: str | None = None
    db_port: int = Field(5432, ge=1, le=65535)
    db_name: str = "consensus_engine"
    db_user: str = "postgres"
    db_password: SecretStr | None = None
    db_instance_connection_name: str | None = None
    db_iam_auth: bool = False
    use_cloud_sql_connector: bool = False
    # Which of the instance's addresses the connector dials: public, private (needs VPC egress
    # from Cloud Run, infra/cloudrun/service.yaml) or psc (Private Service Connect).
    db_ip_type: Literal["public", "private", "psc"] = "public"
    db_pool_size: int = Field(10, ge=1, le=100)
    db_max_overflow: int = Field(0, ge=0, le=100)
    db_pool_timeout_seconds: float = Field(10.0, gt=0.0, le=300.0)
    db_auto_migrate: bool | None = None
    db_connect_timeout_seconds: float = Field(5.0, gt=0.0, le=120.0)
    db_statement_timeout_seconds: float = Field(10.0, gt=0.0, le=600.0)

    # Pub/Sub
    pubsub_project_id: str | None = None
    pubsub_topic: str = "consensus-engine-jobs"
    pubsub_subscription: str = "consensus-engine-jobs-sub"
    pubsub_emulator_host: str | None = None
    # Runs with priority "high" are published here instead of PUBSUB_TOPIC; its own push
    # subscription (scripts/setup_gcp.sh) has its own backlog and push rate, so high-priority
    # jobs never wait behind the normal backlog. Unset: PUBSUB_TOPIC + "-high".
    pubsub_high_priority_topic: str | None = Field(
        None,
        description=(
            "Topic for priority=high jobs (its own push subscription to /pubsub/push); "
            "default: PUBSUB_TOPIC + '-high'"
        ),
    )
    # The pull subscription that keeps dead letters (scripts/setup_gcp.sh --dlq-subscription),
    # read by `python -m app.ops dead-letters`; the service itself never reads it.
    pubsub_dlq_subscription: str = "consensus-engine-jobs-dlq-sub"

    # Recovery: the sweep republishes, re-enqueues and times out runs nobody is working on
    # The in-process timer; 0 turns it off. On Cloud Run (request-based CPU) it is 0 in
    # infra/cloudrun/service.yaml: Cloud Scheduler's POST /tasks/sweep is the one trigger there.
    sweep_interval_seconds: float = Field(60.0, ge=0.0, le=3600.0)
    run_stale_seconds: float = Field(120.0, ge=1.0, le=86400.0)

    # Execution
    worker_max_concurrency: int = Field(100, ge=1, le=1000)
    worker_ack_deadline_seconds: int = Field(600, ge=10, le=600)
    worker_step_timeout_seconds: float = Field(300.0, gt=0.0, le=3600.0)
    worker_job_timeout_seconds: float = Field(1800.0, gt=0.0, le=86400.0)
    run_lease_seconds: float = Field(60.0, ge=1.0, le=3600.0)
    max_delivery_attempts: int = Field(5, ge=1, le=100)

    # Push boundary
    push_auth: Literal["oidc", "cloud-run-iam", "none"] | None = None
    push_audience: str | None = None
    push_service_accounts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    push_oidc_certs_url: str = GOOGLE_V1_CERTS_URL
    push_deadline_seconds: float | None = Field(None, gt=0.0)
    push_max_body_bytes: int = Field(1024 * 1024, ge=1024, le=64 * 1024 * 1024)

    # The /v1 API
    api_auth: Literal["oidc", "none"] | None = None
    # Accepted `aud` of /v1 ID tokens: this service's own (its URL or a custom audience).
    api_audiences: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Also accept gcloud's shared client id (GCLOUD_CLI_AUDIENCE): convenient for user accounts,
    # but any token an allowed person minted for any other purpose then works here too.
    api_allow_gcloud_audience: bool = False
    api_allowed_principals: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Browser origins allowed to call the API (e.g. the reference web app served elsewhere).
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # The run viewer (app/ui/): server-rendered pages at / and their live progress. Unset: on in
    # development only. UI_AUTH guards the pages: `iap` verifies the Identity-Aware Proxy's
    # signed header (x-goog-iap-jwt-assertion) for UI_IAP_AUDIENCE; `api` asks what /v1 asks
    # (API_AUTH's principals); `none` is refused in production.
    ui_enabled: bool | None = None
    ui_auth: Literal["iap", "api", "none"] | None = None
    # IAP's `aud`: /projects/PROJECT_NUMBER/locations/REGION/services/SERVICE (IAP on Cloud Run)
    # or /projects/PROJECT_NUMBER/global/backendServices/ID (behind a load balancer).
    ui_iap_audience: str | None = None
    ui_iap_certs_url: str = IAP_CERTS_URL

    # Traces (app/tracing.py): OpenTelemetry spans exported to Cloud Trace (project
    # PUBSUB_PROJECT_ID, else the credentials' project); off by default.
    tracing_enabled: bool = False
    # The share of traces kept, decided from the trace id, so the API request, the publish and
    # every delivery of one job are kept or dropped together, whichever instance serves them.
    tracing_sample_ratio: float = Field(1.0, ge=0.0, le=1.0)

    @field_validator(
        "push_service_accounts",
        "api_audiences",
        "api_allowed_principals",
        "cors_origins",
        mode="before",
    )
    @classmethod
    def _split_lists(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
        return origins

    @field_validator("pubsub_topic", "pubsub_high_priority_topic")
    @classmethod
    def _check_topic(cls, value: str | None, info: ValidationInfo) -> str | None:
        if not value and info.field_name == "pubsub_high_priority_topic":
            return None  # empty: derived from PUBSUB_TOPIC
        if value is not None and not _TOPIC_ID.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a Pub/Sub topic id (3..255 letters, digits, - _ . ~ + %, "
                "starting with a letter, not with goog)"
            )
        return value

    @field_validator("llm_prices", mode="before")
    @classmethod
    def _decode_prices(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else {}
            except ValueError as exc:
                example = '{"model": {"input_per_1m_usd": 1.25, "output_per_1m_usd": 10}}'
                raise ValueError(f"must be JSON like {example} ({exc})") from None
        return value

    @field_validator("llm_prices")
    @classmethod
    def _merge_prices(cls, prices: dict[str, ModelPrice]) -> dict[str, ModelPrice]:
        for model in prices:
            if not model.strip():
                raise ValueError("a model name must not be empty")
        return {**DEFAULT_PRICES, **prices}

    @field_validator("database_url")
    @classmethod
    def _normalise_database_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        for plain in ("postgres://", "postgresql://"):
            if value.startswith(plain):
                return "postgresql+asyncpg://" + value[len(plain) :]
        if not value.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
            raise ValueError("must be a postgresql+asyncpg:// or sqlite+aiosqlite:// URL")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.env == "production":
            self._check_production()
        if self.effective_llm_provider == "openai" and self.openai_api_key is None:
            raise ValueError("LLM_PROVIDER=openai needs OPENAI_API_KEY")
        if self.use_cloud_sql_connector and not self.db_instance_connection_name:
            raise ValueError("USE_CLOUD_SQL_CONNECTOR=true needs DB_INSTANCE_CONNECTION_NAME")
        if self.effective_push_deadline_seconds >= self.worker_ack_deadline_seconds:
            raise ValueError(
                "PUSH_DEADLINE_SECONDS must be below WORKER_ACK_DEADLINE_SECONDS "
                "so the answer reaches Pub/Sub before it gives up on the request"
            )
        if not _TOPIC_ID.fullmatch(self.effective_pubsub_high_priority_topic):
            raise ValueError(
                "PUBSUB_TOPIC + '-high' is too long for a topic id: set PUBSUB_HIGH_PRIORITY_TOPIC"
            )
        if self.effective_pubsub_high_priority_topic == self.pubsub_topic:
            raise ValueError(
                "PUBSUB_HIGH_PRIORITY_TOPIC must differ from PUBSUB_TOPIC, else high-priority "
                "jobs wait in the same backlog as the others"
            )
        if self.effective_push_auth == "oidc" and not self.push_audience:
            raise ValueError("PUSH_AUTH=oidc needs PUSH_AUDIENCE")
        if self.effective_api_auth == "oidc":
            if not self.api_allowed_principals:
                raise ValueError(
                    "API_AUTH=oidc needs API_ALLOWED_PRINCIPALS (else any Google account could "
                    "call the API)"
                )
            self._check_api_audiences()
        ui_iap = self.effective_ui_enabled and self.effective_ui_auth == "iap"
        if ui_iap and not self.ui_iap_audience:
            raise ValueError(
                "UI_AUTH=iap needs UI_IAP_AUDIENCE: "
                "/projects/PROJECT_NUMBER/locations/REGION/services/SERVICE for IAP on Cloud Run"
            )
        return self

    def _check_api_audiences(self) -> None:
        if GCLOUD_CLI_AUDIENCE in self.api_audiences and not self.api_allow_gcloud_audience:
            raise ValueError(
                f"API_AUDIENCES holds gcloud's shared client id {GCLOUD_CLI_AUDIENCE}, so tokens "
                "minted for any other service would work here: list only this service's URL "
                "or custom audience, or set API_ALLOW_GCLOUD_AUDIENCE=true to accept that"
            )
        if not self.effective_api_audiences:
            prefix = "ENV=production with " if self.env == "production" else ""
            raise ValueError(
                f"{prefix}API_AUTH=oidc needs API_AUDIENCES: the service URL "
                "(https://SERVICE-PROJECT_NUMBER.REGION.run.app) or a custom audience that "
                "/v1 callers mint their ID tokens for"
            )

    def _check_production(self) -> None:
        if self.effective_llm_provider == "offline":
            raise ValueError("ENV=production refuses LLM_PROVIDER=offline")
        if self.openai_api_key is None:
            raise ValueError("ENV=production needs OPENAI_API_KEY")
        if self.effective_push_auth == "none":
            raise ValueError("ENV=production refuses PUSH_AUTH=none")
        if not self.push_service_accounts:
            raise ValueError("ENV=production needs PUSH_SERVICE_ACCOUNTS")
        if self.is_sqlite:
            raise ValueError("ENV=production refuses SQLite; set DATABASE_URL, DB_* or Cloud SQL")
        if not self.pubsub_project_id:
            raise ValueError("ENV=production needs PUBSUB_PROJECT_ID to publish jobs")
        if self.effective_push_auth == "oidc" and self.effective_api_auth == "none":
            # Cloud Run's invoker check is off in oidc mode: nothing else guards /v1.
            raise ValueError("ENV=production with PUSH_AUTH=oidc needs API_AUTH=oidc")
        if self.effective_ui_enabled and self.effective_ui_auth == "none":
            raise ValueError("ENV=production refuses UI_AUTH=none: use iap or api")

    @property
    def effective_llm_provider(self) -> Literal["openai", "offline"]:
        if self.llm_provider is not None:
            return self.llm_provider
        if self.openai_api_key is not None or self.env == "production":
            return "openai"
        return "offline"

    @property
    def effective_push_auth(self) -> Literal["oidc", "cloud-run-iam", "none"]:
        if self.push_auth is not None:
            return self.push_auth
        return "oidc" if self.env == "production" else "none"

    @property
    def effective_api_auth(self) -> Literal["oidc", "none"]:
        if self.api_auth is not None:
            return self.api_auth
        # Behind Cloud Run IAM (cloud-run-iam) the API is already guarded; in oidc mode it is not.
        return "oidc" if self.env == "production" and self.effective_push_auth == "oidc" else "none"

    @property
    def effective_ui_enabled(self) -> bool:
        if self.ui_enabled is not None:
            return self.ui_enabled
        return self.env == "development"

    @property
    def effective_ui_auth(self) -> Literal["iap", "api", "none"]:
        if self.ui_auth is not None:
            return self.ui_auth
        return "iap" if self.env == "production" else "none"

    @property
    def effective_api_audiences(self) -> list[str]:
        """The `aud` values /v1 accepts: API_AUDIENCES, plus gcloud's only when opted in."""
        audiences = list(self.api_audiences)
        if self.api_allow_gcloud_audience and GCLOUD_CLI_AUDIENCE not in audiences:
            audiences.append(GCLOUD_CLI_AUDIENCE)
        return audiences

    @property
    def effective_push_deadline_seconds(self) -> float:
        if self.push_deadline_seconds is not None:
            return self.push_deadline_seconds
        return max(self.worker_ack_deadline_seconds - PUSH_DEADLINE_MARGIN_SECONDS, 1.0)

    @property
    def effective_pubsub_high_priority_topic(self) -> str:
        """Where priority=high jobs are published (PubSubPublisher)."""
        if self.pubsub_high_priority_topic is not None:
            return self.pubsub_high_priority_topic
        return self.pubsub_topic + HIGH_PRIORITY_TOPIC_SUFFIX

    @property
    def effective_expand_model(self) -> str:
        return self.expand_model or self.openai_model

    @property
    def effective_review_model(self) -> str:
        return self.review_model or self.openai_model

    @property
    def sqlalchemy_url(self) -> str:
        """The URL the engine connects to (the Cloud SQL connector replaces the host part)."""
        if self.use_cloud_sql_connector:
            return "postgresql+asyncpg://"
        if self.database_url:
            return self.database_url
        if self.db_host:
            password = (
                ":" + quote_plus(self.db_password.get_secret_value()) if self.db_password else ""
            )
            return (
                f"postgresql+asyncpg://{quote_plus(self.db_user)}{password}"
                f"@{self.db_host}:{self.db_port}/{self.db_name}"
            )
        return EMBEDDED_DATABASE_URL

    @property
    def is_sqlite(self) -> bool:
        return self.sqlalchemy_url.startswith("sqlite")

    @property
    def auto_migrate(self) -> bool:
        """Migrate at start-up: on by default only for the embedded SQLite database."""
        return self.db_auto_migrate if self.db_auto_migrate is not None else self.is_sqlite


def describe_error(error: ValidationError) -> str:
    """One line naming each invalid variable, for the start-up failure message."""
    parts = []
    for item in error.errors():
        name = "_".join(str(p) for p in item["loc"]).upper()
        message = str(item["msg"]).removeprefix("Value error, ")
        parts.append(f"{name}: {message}" if name else message)
    return "invalid configuration: " + "; ".join(parts)


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment, built once; exits with one clear line when invalid."""
    try:
        return Settings()
    except ValidationError as error:
        print(describe_error(error), file=sys.stderr)
        raise SystemExit(2) from None
