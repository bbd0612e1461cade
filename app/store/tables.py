"""Database tables (SQLAlchemy 2 declarative); Alembic migrations build the same schema."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from app.domain.models import Priority, RunType

JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on the way in and out, also on SQLite (which stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    run_type: Mapped[RunType] = mapped_column(String(32))
    priority: Mapped[Priority] = mapped_column(String(16))
    # A revision's parent, and what it asked to change: {"edited_proposal", "edit_notes"}.
    parent_run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), index=True)
    revision: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # Per-run overrides of the configured models and temperatures (NULL: the settings').
    model: Mapped[str | None] = mapped_column(String(128))
    temperature: Mapped[float | None] = mapped_column(Float)
    schema_version: Mapped[str] = mapped_column(String(16), server_default="1.0.0")
    prompt_set_version: Mapped[str] = mapped_column(String(16), server_default="1.0.0")
    status: Mapped[str] = mapped_column(String(16))
    input_idea: Mapped[str] = mapped_column(Text)
    extra_context: Mapped[Any | None] = mapped_column(JSONType)
    # subscription/messageId of a self-contained job, so a redelivery maps to the same run.
    source_key: Mapped[str | None] = mapped_column(String(512), unique=True)
    proposal: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    decision: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    decision_label: Mapped[str | None] = mapped_column(String(16))
    overall_weighted_confidence: Mapped[float | None] = mapped_column(Float)
    error_message: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    delivery_count: Mapped[int] = mapped_column(Integer, default=0)
    # Times the sweep or the dead-letter receiver handed the run to the queue again.
    requeue_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_delivery_attempt: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The outbox: NULL until the job message is accepted by the queue; the relay retries it.
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # A delivery found the daily budget spent before the run started: it waits, queued, and
    # the sweep hands it to the queue again once this moment (the budget's next day) passed.
    deferred_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The number of the run's last event (run_events.seq). Taken by an UPDATE of this row, so
    # a run's events commit in the order of their numbers and a stream resumes without gaps.
    event_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    steps: Mapped[list[StepProgress]] = relationship(
        back_populates="run", order_by="StepProgress.step_order", cascade="all, delete-orphan"
    )
    reviews: Mapped[list[PersonaReviewRow]] = relationship(
        back_populates="run", order_by="PersonaReviewRow.id", cascade="all, delete-orphan"
    )

    __table_args__ = (
        Index("ix_runs_status_created_at", "status", "created_at"),
        Index("ix_runs_created_at", "created_at"),
        Index("ix_runs_decision_label", "decision_label"),
        Index("ix_runs_unpublished", "status", "published_at"),
        Index("ix_runs_status_updated_at", "status", "updated_at"),
    )


class StepProgress(Base):
    __tablename__ = "step_progress"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step_name: Mapped[str] = mapped_column(String(64))
    step_order: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    error_message: Mapped[str | None] = mapped_column(Text)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    total_tokens: Mapped[int] = mapped_column(Integer, default=0)
    # A revision's review taken over unchanged: the run whose LLM call produced it.
    reused_from_run_id: Mapped[str | None] = mapped_column(String(36))
    # The model of the step's last call, and what its calls cost in US dollars (LLM_PRICES):
    # NULL once a call's model had no price. `spent_at` is when cost was last added: the
    # daily budget sums the costs spent in its day.
    model: Mapped[str | None] = mapped_column(String(128))
    cost_usd: Mapped[float | None] = mapped_column(Float, default=0.0)
    spent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    run: Mapped[Run] = relationship(back_populates="steps")

    __table_args__ = (
        UniqueConstraint("run_id", "step_name", name="uq_step_progress_run_step"),
        Index("ix_step_progress_spent_at", "spent_at"),
    )


class PersonaReviewRow(Base):
    __tablename__ = "persona_reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    persona_id: Mapped[str] = mapped_column(String(64))
    persona_name: Mapped[str] = mapped_column(String(128))
    weight: Mapped[float] = mapped_column(Float)
    confidence_score: Mapped[float] = mapped_column(Float)
    review: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    run: Mapped[Run] = relationship(back_populates="reviews")

    __table_args__ = (
        UniqueConstraint("run_id", "persona_id", name="uq_persona_reviews_run_persona"),
    )


class RunEventRow(Base):
    """A run's progress as it happened, numbered 1, 2, 3... per run: what the live stream sends
    and resumes from (Last-Event-ID). On PostgreSQL a trigger NOTIFYs each row as it commits."""

    __tablename__ = "run_events"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    event: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class QuarantinedMessage(Base):
    """A push request that could not be turned into a job, kept whole for inspection."""

    __tablename__ = "quarantined_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    reason: Mapped[str] = mapped_column(Text)
    message_id: Mapped[str | None] = mapped_column(String(256))
    subscription: Mapped[str | None] = mapped_column(String(512))
    headers: Mapped[dict[str, str]] = mapped_column(JSONType)
    raw_body: Mapped[bytes] = mapped_column(LargeBinary)


class DeadLetter(Base):
    """A job Pub/Sub gave up on, and what the dead-letter receiver did with it."""

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    run_id: Mapped[str | None] = mapped_column(String(36), index=True)
    message_id: Mapped[str | None] = mapped_column(String(256))
    source_subscription: Mapped[str | None] = mapped_column(String(512))
    delivery_attempts: Mapped[int | None] = mapped_column(Integer)
    # requeued | failed | finished | in_progress
    action: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
