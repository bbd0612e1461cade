"""Recovery: how often a run was re-enqueued, and the dead letters received.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.store.tables import UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column("requeue_count", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_index("ix_runs_status_updated_at", "runs", ["status", "updated_at"])
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("run_id", sa.String(36), nullable=True),
        sa.Column("message_id", sa.String(256), nullable=True),
        sa.Column("source_subscription", sa.String(512), nullable=True),
        sa.Column("delivery_attempts", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
    )
    op.create_index("ix_dead_letters_received_at", "dead_letters", ["received_at"])
    op.create_index("ix_dead_letters_run_id", "dead_letters", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_run_id", table_name="dead_letters")
    op.drop_index("ix_dead_letters_received_at", table_name="dead_letters")
    op.drop_table("dead_letters")
    op.drop_index("ix_runs_status_updated_at", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("requeue_count")
