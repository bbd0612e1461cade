"""Outbox column: when a run's job message was accepted by the queue.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.store.tables import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("published_at", UTCDateTime(), nullable=True))
    # Runs that existed before the outbox were delivered already (or will be by redelivery).
    op.execute(sa.text("UPDATE runs SET published_at = queued_at"))
    op.create_index("ix_runs_unpublished", "runs", ["status", "published_at"])


def downgrade() -> None:
    op.drop_index("ix_runs_unpublished", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("published_at")
