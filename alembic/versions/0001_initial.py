"""Runs, step progress, persona reviews and quarantined messages.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.store.tables import JSONType, UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("run_type", sa.String(32), nullable=False),
        sa.Column("priority", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("input_idea", sa.Text(), nullable=False),
        sa.Column("extra_context", JSONType, nullable=True),
        sa.Column("source_key", sa.String(512), nullable=True, unique=True),
        sa.Column("proposal", JSONType, nullable=True),
        sa.Column("decision", JSONType, nullable=True),
        sa.Column("decision_label", sa.String(16), nullable=True),
        sa.Column("overall_weighted_confidence", sa.Float(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_expires_at", UTCDateTime(), nullable=True),
        sa.Column("delivery_count", sa.Integer(), nullable=False),
        sa.Column("last_delivery_attempt", sa.Integer(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("queued_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_runs_status_created_at", "runs", ["status", "created_at"])
    op.create_index("ix_runs_created_at", "runs", ["created_at"])
    op.create_index("ix_runs_decision_label", "runs", ["decision_label"])

    op.create_table(
        "step_progress",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "run_id", sa.String(36), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("step_name", sa.String(64), nullable=False),
        sa.Column("step_order", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("completed_at", UTCDateTime(), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("total_tokens", sa.Integer(), nullable=False),
        sa.UniqueConstraint("run_id", "step_name", name="uq_step_progress_run_step"),
    )

    op.create_table(
        "persona_reviews",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "run_id", sa.String(36), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("persona_id", sa.String(64), nullable=False),
        sa.Column("persona_name", sa.String(128), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("confidence_score", sa.Float(), nullable=False),
        sa.Column("review", JSONType, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("run_id", "persona_id", name="uq_persona_reviews_run_persona"),
    )

    op.create_table(
        "quarantined_messages",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("message_id", sa.String(256), nullable=True),
        sa.Column("subscription", sa.String(512), nullable=True),
        sa.Column("headers", JSONType, nullable=False),
        sa.Column("raw_body", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_quarantined_messages_received_at", "quarantined_messages", ["received_at"])


def downgrade() -> None:
    op.drop_table("quarantined_messages")
    op.drop_table("persona_reviews")
    op.drop_table("step_progress")
    op.drop_table("runs")
