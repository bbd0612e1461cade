"""Run events: written in the transaction of the change they describe, read back by number.

Every progress write (a step started, failed an attempt, completed or failed; a run completed or
failed) takes the run's next event number with an UPDATE of the run's row, which also fences the
write by the lease where one applies, and adds a `run_events` row in the same transaction. The
row lock orders a run's commits by their numbers, so a reader that saw event n has seen every
event before it: resuming from Last-Event-ID is `seq > n`, and a gap in what arrives live means
something was missed. On PostgreSQL a trigger NOTIFYs each row at commit (migration 0006); on
SQLite the repository hands the committed events to the process's broadcaster (`announce`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from app.domain.personas import STEP_NAMES
from app.store.base import Repository, db_time
from app.store.tables import JSONType, Run, RunEventRow

EventName = Literal[
    "step_started",
    "step_attempt_failed",
    "step_completed",
    "step_failed",
    "run_completed",
    "run_failed",
]
TERMINAL_EVENTS = frozenset({"run_completed", "run_failed"})
# Error texts in events are cut to this: the whole event must fit a NOTIFY payload (8000 bytes);
# the step's full error stays in step_progress.
EVENT_ERROR_CHARS = 500
# More events than a run makes (about 20, a few more per retried attempt): one read is enough.
BACKLOG_LIMIT = 1000


@dataclass(frozen=True)
class RunEvent:
    """One numbered event of one run, as the stream sends it."""

    run_id: str
    seq: int
    event: str
    at: datetime
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS

    def payload(self) -> dict[str, Any]:
        """The event's JSON body: its fields, then what the event carries."""
        return {
            **self.data,
            "run_id": self.run_id,
            "seq": self.seq,
            "event": self.event,
            "at": self.at.isoformat(),
        }

    @classmethod
    def from_notification(cls, payload: str) -> RunEvent:
        """The event from the NOTIFY payload migration 0006's trigger builds; ValueError if not."""
        document = json.loads(payload)
        if not isinstance(document, dict) or not isinstance(document.get("data"), dict):
            raise ValueError("not a run event")
        at = datetime.fromisoformat(str(document["at"]))
        return cls(
            run_id=str(document["run_id"]),
            seq=int(document["seq"]),
            event=str(document["event"]),
            at=(at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC),
            data=document["data"],
        )


def step_event(step: str, status: str, **fields: Any) -> dict[str, Any]:
    """What a step event carries: the step, its new status and the event's own fields."""
    error = fields.get("error_message")
    if isinstance(error, str):
        fields["error_message"] = error[:EVENT_ERROR_CHARS]
    return {
        "step_name": step,
        "step_order": STEP_NAMES.index(step) + 1,
        "status": status,
        **fields,
    }


def run_failed_event(error: str) -> dict[str, Any]:
    """What a `run_failed` event carries."""
    return {"status": "failed", "error_message": error[:EVENT_ERROR_CHARS]}


def next_event_numbers(*fence: Any, count: int = 1) -> Any:
    """The UPDATE that takes the run's next `count` event numbers (RETURNING the last); `fence`
    adds conditions (the lease) under which the numbers, and so the write, may be taken."""
    return (
        update(Run)
        .where(*fence)
        .values(event_seq=Run.event_seq + count)
        .returning(Run.event_seq)
        .execution_options(synchronize_session=False)
    )


# Built once: SQLAlchemy reuses a statement object's compiled form (see app/store/runs.py).
_INSERT_EVENT = (
    insert(RunEventRow)
    .values(
        run_id=bindparam("e_run_id"),
        seq=bindparam("e_seq"),
        event=bindparam("e_event"),
        data=bindparam("e_data", type_=JSONType),
        created_at=db_time(),
    )
    .returning(RunEventRow.created_at)
)


async def add_event(
    connection: AsyncConnection,
    events: list[RunEvent],
    run_id: str,
    seq: int,
    event: EventName,
    data: dict[str, Any],
) -> None:
    """Add event `seq` of the run in the connection's transaction, and to `events` (those the
    transaction announces once it committed)."""
    at = await connection.scalar(
        _INSERT_EVENT, {"e_run_id": run_id, "e_seq": seq, "e_event": event, "e_data": data}
    )
    assert at is not None
    events.append(RunEvent(run_id, seq, event, at, data))


class EventStore(Repository):
    """Reads a run's events back."""

    async def backlog(self, run_id: str, after: int) -> tuple[str | None, Sequence[RunEvent]]:
        """The run's status (None: no such run) and its events numbered above `after`."""
        async with self._transaction() as session:
            status = await session.scalar(select(Run.status).where(Run.id == run_id))
            if status is None:
                return None, ()
            rows = await session.execute(
                select(RunEventRow)
                .where(RunEventRow.run_id == run_id, RunEventRow.seq > after)
                .order_by(RunEventRow.seq)
                .limit(BACKLOG_LIMIT)
            )
            events = [
                RunEvent(row.run_id, row.seq, row.event, row.created_at, row.data)
                for row in rows.scalars()
            ]
            return str(status), events
