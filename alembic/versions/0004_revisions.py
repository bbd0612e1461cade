"""Revisions: a run's parent and edits, per-run model and temperature, versions, reused steps.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from app.store.tables import JSONType

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("parent_run_id", sa.String(36), nullable=True))
        batch.add_column(sa.Column("revision", JSONType, nullable=True))
        batch.add_column(sa.Column("model", sa.String(128), nullable=True))
        batch.add_column(sa.Column("temperature", sa.Float(), nullable=True))
        batch.add_column(
            sa.Column("schema_version", sa.String(16), nullable=False, server_default="1.0.0")
        )
        batch.add_column(
            sa.Column("prompt_set_version", sa.String(16), nullable=False, server_default="1.0.0")
        )
        batch.create_foreign_key("fk_runs_parent_run_id", "runs", ["parent_run_id"], ["id"])
        batch.create_index("ix_runs_parent_run_id", ["parent_run_id"])
    with op.batch_alter_table("step_progress") as batch:
        batch.add_column(sa.Column("reused_from_run_id", sa.String(36), nullable=True))
    # Runs made before revisions existed are the reference's "initial" runs.
    op.execute("UPDATE runs SET run_type = 'initial' WHERE run_type = 'full_review'")


def downgrade() -> None:
    op.execute("UPDATE runs SET run_type = 'full_review' WHERE run_type = 'initial'")
    with op.batch_alter_table("step_progress") as batch:
        batch.drop_column("reused_from_run_id")
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_parent_run_id")
        batch.drop_constraint("fk_runs_parent_run_id", type_="foreignkey")
        for column in (
            "prompt_set_version",
            "schema_version",
            "temperature",
            "model",
            "revision",
            "parent_run_id",
        ):
            batch.drop_column(column)
