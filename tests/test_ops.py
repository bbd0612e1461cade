"""The operator view lists quarantined messages and runs that need attention."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.ext.asyncio import create_async_engine

from app.ops import report
from app.store.runs import RunStore, utcnow
from app.store.tables import Run
from tests.procs import ROOT


async def set_run(pg_url: str, run_id: str, **values: object) -> None:
    engine = create_async_engine(pg_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(update(Run).where(Run.id == run_id).values(**values))
    finally:
        await engine.dispose()


async def test_runs_needing_attention(store: RunStore, pg_url: str) -> None:
    now = utcnow()
    failed = await store.create_run("Failed idea.", None)
    dead = await store.create_run("Dead owner.", None)
    live = await store.create_run("Live owner.", None)
    done = await store.create_run("Done.", None)
    await set_run(pg_url, failed.id, status="failed", error_message="the model refused")
    await set_run(
        pg_url,
        dead.id,
        status="running",
        started_at=now,
        lease_owner="host:1/abc",
        lease_expires_at=now - timedelta(seconds=90),
    )
    await set_run(
        pg_url,
        live.id,
        status="running",
        started_at=now,
        lease_owner="host:2/def",
        lease_expires_at=now + timedelta(seconds=60),
    )
    await set_run(pg_url, done.id, status="completed")

    text = "\n".join(await report(store, "runs", 50, False))

    assert "2 run(s) needing attention" in text
    assert failed.id in text and "the model refused" in text
    assert dead.id in text and "host:1/abc expired" in text
    assert live.id not in text and done.id not in text


async def test_quarantine_listing(store: RunStore) -> None:
    await store.quarantine("message data is not valid base64", b"x" * 300, {}, "m-9", "sub")
    short = "\n".join(await report(store, "quarantine", 10, False))
    assert "1 quarantined message(s)" in short
    assert "message_id=m-9" in short and "not valid base64" in short
    assert "(300 B)" in short
    full = "\n".join(await report(store, "quarantine", 10, True))
    assert "(300 B)" not in full


def test_command_line_reads_the_configured_database(pg_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": pg_url}
    result = subprocess.run(
        [sys.executable, "-m", "app.ops", "runs", "--limit", "5"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "run(s) needing attention" in result.stdout
