"""Run events: each run's progress numbered per run, NOTIFYed on PostgreSQL as it commits.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from app.store.tables import UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The channel app/events.py LISTENs on. The payload is the whole event (a few hundred bytes:
# error texts in events are cut short), under NOTIFY's 8000-byte limit, so listeners need
# no query per event.
_NOTIFY_FUNCTION = """
CREATE FUNCTION notify_run_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('run_events', json_build_object(
        'run_id', NEW.run_id, 'seq', NEW.seq, 'event', NEW.event,
        'at', NEW.created_at, 'data', NEW.data)::text);
    RETURN NULL;
END
$$
"""
_NOTIFY_TRIGGER = """
CREATE TRIGGER run_events_notify AFTER INSERT ON run_events
FOR EACH ROW EXECUTE FUNCTION notify_run_event()
"""


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("event_seq", sa.Integer(), nullable=False, server_default="0"))
    op.create_table(
        "run_events",
        sa.Column(
            "run_id",
            sa.String(36),
            sa.ForeignKey("runs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("seq", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("data", sa.JSON().with_variant(JSONB(), "postgresql"), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_NOTIFY_FUNCTION)
        op.execute(_NOTIFY_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER run_events_notify ON run_events")
        op.execute("DROP FUNCTION notify_run_event()")
    op.drop_table("run_events")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("event_seq")
