"""Cost: each step's model, cost and when it was spent; runs deferred by the daily budget.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.store.tables import UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("step_progress") as batch:
        batch.add_column(sa.Column("model", sa.String(128), nullable=True))
        batch.add_column(sa.Column("cost_usd", sa.Float(), nullable=True))
        batch.add_column(sa.Column("spent_at", UTCDateTime(), nullable=True))
        batch.create_index("ix_step_progress_spent_at", ["spent_at"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("deferred_until", UTCDateTime(), nullable=True))
    # Steps recorded before prices existed: no tokens cost nothing; the others' model and
    # price are unknown, so their cost stays unknown (NULL).
    op.execute("UPDATE step_progress SET cost_usd = 0 WHERE total_tokens = 0")


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("deferred_until")
    with op.batch_alter_table("step_progress") as batch:
        batch.drop_index("ix_step_progress_spent_at")
        for column in ("spent_at", "cost_usd", "model"):
            batch.drop_column(column)
