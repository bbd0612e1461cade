"""`make bench`: the push path's performance, each figure against a floor from the same run.

    .venv/bin/python -m benchmarks.bench                  # the whole table (about 2-4 minutes)
    .venv/bin/python -m benchmarks.bench --markdown       # the same table as markdown
    .venv/bin/python -m benchmarks.bench --app-env WORKER_MAX_CONCURRENCY=200 --only at-once

Starts the real app (uvicorn, a scratch PostgreSQL database, OIDC on with a local issuer), the
fake OpenAI server with a settable latency and wrk; prints one table. Measures; asserts nothing.
See docs/PERFORMANCE.md for what each row means.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import jwt

from app.auth import OidcAuthenticator
from app.push.envelope import encode_wrapped
from benchmarks.harness import (
    AppProcess,
    ConnectionSampler,
    Database,
    Profile,
    Signer,
    WrkResult,
    app_environment,
    certs_server,
    empty_runs,
    ensure_wrk,
    listen_overflows,
    machine_description,
    profile_during,
    run_statuses,
    run_wrk,
    say,
    scratch_database,
    scratch_directory,
    setting,
)
from tests.fakes.openai_server import FakeOpenAI

AUDIENCE = "https://consensus-engine.bench.run.app/pubsub/push"
PUSHER = "pusher@bench.iam.gserviceaccount.com"
STEPS = (
    "expand",
    "review_architect",
    "review_critic",
    "review_optimist",
    "review_security_guardian",
    "review_user_advocate",
)
PHASES = ("main", "sequential", "at-once", "verify", "cold", "ceiling")
ID_MARK = "@@MESSAGE_ID@@"
CONNECTIONS = 20
CRITICAL_LATENCY = 0.3
AT_ONCE_LATENCY = 1.0
REDELIVERY_DELAY = 0.5
SHOWN_SETTINGS = (
    "WORKER_MAX_CONCURRENCY",
    "LLM_MAX_CONCURRENCY",
    "DB_POOL_SIZE",
    "DB_MAX_OVERFLOW",
    "LOG_LEVEL",
)


@dataclass(frozen=True)
class Row:
    measure: str
    figure: str
    floor: str = "—"
    ratio: str = "—"
    target: str = "—"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    profile: Profile | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Bench:
    """What every phase shares: the database, the fakes, the options."""

    database: Database
    fake: FakeOpenAI
    signer: Signer
    certs_url: str
    logs: Path
    extra_env: dict[str, str]
    seconds: float
    runs: int
    at_once: list[int]
    deadline: float
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def env(self, **overrides: str) -> dict[str, str]:
        """The app's environment: bench defaults, then --app-env, then the phase's own."""
        return {
            "ENV": "testing",
            "LOG_LEVEL": "INFO",  # as in production (infra/cloudrun/service.yaml)
            "DATABASE_URL": self.database.url,
            "LLM_PROVIDER": "openai",
            "OPENAI_API_KEY": "sk-bench",
            "OPENAI_BASE_URL": self.fake.url,
            "PUSH_AUTH": "oidc",
            "PUSH_AUDIENCE": AUDIENCE,
            "PUSH_SERVICE_ACCOUNTS": PUSHER,
            "PUSH_OIDC_CERTS_URL": self.certs_url,
            "SWEEP_INTERVAL_SECONDS": "3600",
            **self.extra_env,
            **overrides,
        }

    @property
    def authorization(self) -> str:
        return f"Bearer {self.signer.token(AUDIENCE, PUSHER)}"

    def latency(self, seconds: float) -> None:
        """Every LLM call of the fake answers after `seconds`."""
        self.fake.step_delay.clear()
        self.fake.step_delay.update(dict.fromkeys(STEPS, seconds))

    def envelope(self, label: str, index: int | str) -> bytes:
        """A self-contained job, its own run: a new messageId on the phase's subscription."""
        return encode_wrapped(
            {"idea": f"A shared tool library for neighbours, variant {index}."},
            f"{self.tag}-{label}-{index}",
            subscription(label),
        )

    @asynccontextmanager
    async def app(self, label: str, **overrides: str) -> AsyncIterator[AppProcess]:
        """A new app process on a database without runs; stopped however the phase ends."""
        await empty_runs(self.database)
        app = AppProcess(self.env(**overrides), self.logs / f"app-{label}.log")
        say(f"starting the app ({label})")
        try:
            await asyncio.to_thread(app.start)
            yield app
        finally:
            await asyncio.to_thread(app.stop)


def subscription(label: str) -> str:
    return f"projects/bench/subscriptions/{label}"


# --- formatting --------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


def ratio(figure: float, floor: float) -> str:
    return f"{figure / floor:.3g}x" if floor > 0 else "—"


def per_second(value: float) -> str:
    return f"{value:,.0f}/s" if value >= 100 else f"{value:.1f}/s"


def statuses_text(statuses: dict[str, int]) -> str:
    ordered = sorted(statuses.items())
    return ", ".join(f"{status}: {count}" for status, count in ordered)


def non2xx_text(count: int, total: int, statuses: dict[str, int]) -> str:
    others = {k: v for k, v in statuses.items() if not k.startswith("2")}
    detail = f" ({statuses_text(others)})" if others else ""
    return f"{count} of {total}{detail}"


# --- phases ------------------------------------------------------------------------------------


async def push(client: httpx2.AsyncClient, url: str, body: bytes, authorization: str) -> int:
    headers = {"authorization": authorization, "content-type": "application/json"}
    response = await client.post(f"{url}/pubsub/push", content=body, headers=headers)
    return response.status_code


async def storm_and_critical(bench: Bench, report: Report) -> WrkResult:
    """Rows 1-3 on one app: the /health floor, the duplicate storm, the critical path."""
    async with bench.app("main") as app:
        say(f"GET /health, {CONNECTIONS} connections, {bench.seconds:g} s")
        health = await run_wrk(f"{app.url}/health", connections=CONNECTIONS, seconds=bench.seconds)
        report.rows += [
            Row(f"GET /health, {CONNECTIONS} conn: req/s", per_second(health.rate), "floor"),
            Row("GET /health: p50", ms(health.p50_ms / 1000), "floor"),
            Row("GET /health: p99", ms(health.p99_ms / 1000), "floor"),
        ]

        say("duplicate storm: one run completed, then its envelope again and again")
        bench.latency(0.0)
        body = bench.envelope("storm", 0)
        authorization = bench.authorization
        async with httpx2.AsyncClient(timeout=60) as client:
            first = await push(client, app.url, body, authorization)
        if first != 204:
            report.notes.append(f"duplicate storm: the first delivery answered {first}, not 204")
        async with ConnectionSampler(bench.database).active() as connections:
            storm = await run_wrk(
                f"{app.url}/pubsub/push",
                connections=CONNECTIONS,
                seconds=bench.seconds,
                method="POST",
                body=body.decode(),
                authorization=authorization,
            )
        report.rows += [
            Row(
                "duplicate storm: req/s",
                per_second(storm.rate),
                per_second(health.rate),
                ratio(storm.rate, health.rate),
                "≥ 0.5x",
            ),
            Row(
                "duplicate storm: p50",
                ms(storm.p50_ms / 1000),
                ms(health.p50_ms / 1000),
                ratio(storm.p50_ms, health.p50_ms),
            ),
            Row(
                "duplicate storm: p99",
                ms(storm.p99_ms / 1000),
                ms(health.p99_ms / 1000),
                ratio(storm.p99_ms, health.p99_ms),
                "< 20 ms",
            ),
            Row(
                "duplicate storm: non-2xx",
                non2xx_text(storm.non2xx, storm.requests, storm.statuses),
                "0",
                target="0",
            ),
            Row(
                "duplicate storm: DB connections opened",
                str(connections.opened),
                "0",
                target="0",
            ),
        ]
        if storm.socket_errors:
            report.notes.append(f"duplicate storm: {storm.socket_errors} socket errors in wrk")

        ours = await critical_path(bench, app, "critical")
    floor = 2 * CRITICAL_LATENCY
    measured = await llm_round_trips(bench)
    report.rows += [
        Row(
            f"critical path, L={CRITICAL_LATENCY:g} s: push → 204 (median of {bench.runs})",
            ms(ours),
            f"2·L = {ms(floor)}",
            ratio(ours, floor),
            "≤ 2·L + 50 ms",
        ),
        Row("critical path: overhead above 2·L", ms(ours - floor), "0", target="≤ 50 ms"),
        Row(
            "critical path: overhead above the fake LLM's own round trips",
            ms(ours - measured),
            f"expand + 5 reviews at once, bare HTTP = {ms(measured)}",
            ratio(ours, measured),
        ),
    ]
    return health


async def llm_round_trips(bench: Bench) -> float:
    """What the two LLM waves cost by themselves through the fake server (median of 5): one
    expand, then five reviews at once, posted with a bare HTTP client. What the critical path
    takes beyond this is the app's own (plus the SDK's)."""
    bench.latency(CRITICAL_LATENCY)
    body = {"model": "bench", "instructions": "Review.", "input": "An idea.", "store": False}

    async def call(client: httpx2.AsyncClient, step: str) -> None:
        headers = {"x-client-request-id": f"bench/{step}/1", "authorization": "Bearer sk-bench"}
        response = await client.post(f"{bench.fake.url}/responses", json=body, headers=headers)
        response.raise_for_status()

    waves: list[float] = []
    async with httpx2.AsyncClient(timeout=30) as client:
        for _ in range(6):
            started = time.perf_counter()
            await call(client, "expand")
            await asyncio.gather(*(call(client, step) for step in STEPS[1:]))
            waves.append(time.perf_counter() - started)
    return statistics.median(waves[1:])


async def critical_path(bench: Bench, app: AppProcess, label: str) -> float:
    """Median seconds from push to 204 of `bench.runs` runs, one at a time, after a warm-up."""
    say(f"critical path ({label}): every LLM call {CRITICAL_LATENCY:g} s")
    bench.latency(CRITICAL_LATENCY)
    authorization = bench.authorization
    timings: list[float] = []
    async with httpx2.AsyncClient(timeout=60) as client:
        for index in range(bench.runs + 1):
            started = time.perf_counter()
            status = await push(client, app.url, bench.envelope(label, index), authorization)
            elapsed = time.perf_counter() - started
            if status != 204:
                raise RuntimeError(f"critical path ({label}): a push answered {status}")
            if index > 0:  # the first pays for connections and caches; Pub/Sub's later ones don't
                timings.append(elapsed)
    return statistics.median(timings)


async def sequential_reference(bench: Bench, report: Report) -> None:
    """The reference design: the same run with the LLM calls one after another (6·L)."""
    async with bench.app("sequential", LLM_MAX_CONCURRENCY="1") as app:
        reference = await critical_path(bench, app, "sequential")
    floor = 6 * CRITICAL_LATENCY
    report.rows.append(
        Row(
            "reference: reviews sequential (LLM_MAX_CONCURRENCY=1)",
            ms(reference),
            f"6·L = {ms(floor)}",
            ratio(reference, floor),
        )
    )


@dataclass
class Deliveries:
    completed: int = 0
    wall: float | None = None  # seconds until every delivery had its 2xx
    non2xx: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    connection_errors: int = 0
    unanswered: int = 0  # requests still waiting for their answer when the phase's bound came


async def deliver_all(
    url: str, bodies: Sequence[bytes], authorization: str, deadline: float
) -> Deliveries:
    """All `bodies` pushed at once; each non-2xx redelivered after 0.5 s until `deadline`."""
    result = Deliveries()
    headers = {"authorization": authorization, "content-type": "application/json"}
    limits = httpx2.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    started = time.perf_counter()
    stop_at = started + deadline
    finished: list[float] = []

    async with httpx2.AsyncClient(limits=limits, timeout=deadline) as client:

        async def deliver(body: bytes) -> None:
            while (remaining := stop_at - time.perf_counter()) > 0:
                try:
                    response = await client.post(
                        f"{url}/pubsub/push", content=body, headers=headers, timeout=remaining
                    )
                except httpx2.TimeoutException:
                    result.unanswered += 1  # the timeout is the phase's bound
                except httpx2.TransportError:
                    result.connection_errors += 1
                else:
                    status = str(response.status_code)
                    result.statuses[status] = result.statuses.get(status, 0) + 1
                    if 200 <= response.status_code < 300:
                        finished.append(time.perf_counter() - started)
                        return
                    result.non2xx += 1
                await asyncio.sleep(REDELIVERY_DELAY)

        await asyncio.gather(*(deliver(body) for body in bodies))
    result.completed = len(finished)
    if len(finished) == len(bodies):
        result.wall = max(finished, default=0.0)
    return result


def pool_timeouts(log: str) -> int:
    return len(re.findall(r"QueuePool limit|TimeoutError", log))


async def at_once(bench: Bench, report: Report, count: int) -> None:
    """`count` runs delivered at once, every LLM call 1 s, on a fresh app process."""
    label = f"at-once-{count}"
    bench.latency(AT_ONCE_LATENCY)
    async with bench.app(label) as app:
        idle_kib = app.memory_kib("VmRSS") or 0
        bodies = [bench.envelope(label, index) for index in range(count)]
        say(f"{count} runs at once, every LLM call {AT_ONCE_LATENCY:g} s (≤ {bench.deadline:g} s)")
        overflows = listen_overflows()
        async with ConnectionSampler(bench.database).active() as connections:
            result = await deliver_all(app.url, bodies, bench.authorization, bench.deadline)
        overflows = listen_overflows() - overflows
        peak_kib = app.memory_kib("VmHWM") or 0
        runs = await run_statuses(bench.database, subscription(label) + "/")
        timeouts = pool_timeouts(app.log())
    if overflows > 0:
        report.notes.append(
            f"{label}: {overflows} TCP listen-queue overflows on this machine meanwhile; connects "
            "were retried after a second, so the wall time may hold more than the app's own cost"
        )
    floor = 2 * AT_ONCE_LATENCY
    pool = int(setting(bench.env(), "DB_POOL_SIZE"))
    overflow = int(setting(bench.env(), "DB_MAX_OVERFLOW"))
    prefix = f"{count} at once, L={AT_ONCE_LATENCY:g} s"
    if result.wall is not None:
        wall, wall_ratio = f"{result.wall:.2f} s", ratio(result.wall, floor)
    else:
        wall = f"> {bench.deadline:g} s ({result.completed}/{count} answered 2xx)"
        wall_ratio = "—"
    completed = runs.get("completed", 0)
    others = {status: n for status, n in runs.items() if status != "completed"}
    lost = count - sum(runs.values())
    in_db = f"{completed}/{count}" + (f" ({statuses_text(others)})" if others else "")
    if lost:
        in_db += f", {lost} never recorded"
    report.rows += [
        Row(
            f"{prefix}: wall until all 2xx",
            wall,
            f"2·L = {floor:g} s",
            wall_ratio,
            f"≤ {floor + 1:g} s" if count <= 100 else "queues, no errors",
        ),
        Row(
            f"{prefix}: non-2xx answers",
            f"{result.non2xx}"
            + (f" ({statuses_text(_non2xx(result.statuses))})" if result.non2xx else ""),
            "0",
            target="0" if count <= 100 else "—",
        ),
        Row(f"{prefix}: connection errors", str(result.connection_errors), "0", target="0"),
        Row(f"{prefix}: requests unanswered at the bound", str(result.unanswered), "0"),
        Row(f"{prefix}: pool timeouts (app log)", str(timeouts), "0", target="0"),
        Row(
            f"{prefix}: DB connections max open / opened",
            f"{connections.max_open} / {connections.opened}",
            f"pool {pool} + overflow {overflow}",
            target=f"≤ {pool} (pool size)",
        ),
        Row(
            f"{prefix}: peak RSS",
            f"{peak_kib / 1024:.0f} MiB",
            f"idle {idle_kib / 1024:.0f} MiB",
            ratio(peak_kib, idle_kib),
        ),
        Row(f"{prefix}: runs completed in DB", in_db, str(count), target="all"),
    ]


def _non2xx(statuses: dict[str, int]) -> dict[str, int]:
    return {status: n for status, n in statuses.items() if not status.startswith("2")}


async def token_verification(bench: Bench, report: Report, count: int = 2000) -> None:
    """µs per `OidcAuthenticator.verify` with warm certificates, against PyJWT's bare decode:
    the same token again (as Pub/Sub reuses one for up to an hour), and tokens never seen."""
    say(f"token verification: {count} in-process verifications")
    token = bench.signer.token(AUDIENCE, PUSHER)
    authenticator = OidcAuthenticator(
        audience=AUDIENCE, service_accounts=[PUSHER], certs_url=bench.certs_url
    )
    await authenticator.verify(f"Bearer {token}")  # fetches and caches the certificates
    started = time.perf_counter()
    for _ in range(count):
        await authenticator.verify(f"Bearer {token}")
    same = (time.perf_counter() - started) / count

    fresh_tokens = [bench.signer.token(AUDIENCE, PUSHER, nonce=str(i)) for i in range(count // 10)]
    started = time.perf_counter()
    for fresh in fresh_tokens:
        await authenticator.verify(f"Bearer {fresh}")
    new = (time.perf_counter() - started) / len(fresh_tokens)

    public_key = bench.signer.private.public_key()
    started = time.perf_counter()
    for _ in range(count):
        jwt.decode(token, public_key, algorithms=["RS256"], audience=AUDIENCE)
    floor = (time.perf_counter() - started) / count
    floor_text = f"PyJWT RS256 decode {floor * 1e6:.0f} µs"
    report.rows += [
        Row(
            "token verification, warm cache, same token",
            f"{same * 1e6:.0f} µs",
            floor_text,
            ratio(same, floor),
        ),
        Row(
            "token verification, warm cache, new token",
            f"{new * 1e6:.0f} µs",
            floor_text,
            ratio(new, floor),
        ),
    ]


def median_of(times: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(times))


async def cold_start(bench: Bench, report: Report, times: int = 3) -> None:
    """Process start to the first `/ready` 200, against importing the app and exiting."""
    say(f"cold start: {times} starts to /ready")
    await empty_runs(bench.database)
    env = bench.env()

    def start_once() -> float:
        app = AppProcess(env, bench.logs / "app-cold.log")
        try:
            return app.start()
        finally:
            app.stop()

    def import_once() -> float:
        # The child reports when its imports are done: interpreter exit (grpc's atexit hooks
        # among others) is no part of a start.
        started = time.time()
        done = subprocess.run(
            [sys.executable, "-c", "import time, app.main; print(time.time())"],
            env=app_environment(env),
            cwd=bench.logs,
            check=True,
            timeout=60,
            capture_output=True,
            text=True,
        )
        return float(done.stdout.split()[-1]) - started

    ours = median_of(times, start_once)
    floor = median_of(times, import_once)
    report.rows.append(
        Row(
            f"cold start: process start → /ready 200 (median of {times})",
            ms(ours),
            f"import app.main {ms(floor)}",
            ratio(ours, floor),
        )
    )


async def ceiling(bench: Bench, report: Report, health: WrkResult | None) -> None:
    """Runs per second on the offline provider, then a py-spy profile under the same load."""
    async with bench.app("offline", LLM_PROVIDER="offline") as app:
        body = encode_wrapped(
            {"idea": "A shared tool library for neighbours."}, ID_MARK, subscription("ceiling")
        ).decode()
        authorization = bench.authorization

        async def load(prefix: str) -> WrkResult:
            return await run_wrk(
                f"{app.url}/pubsub/push",
                connections=CONNECTIONS,
                seconds=bench.seconds,
                method="POST",
                body=body,
                authorization=authorization,
                id_mark=ID_MARK,
                id_prefix=f"{bench.tag}-{prefix}",
            )

        say(f"throughput ceiling: offline provider, unique jobs, {bench.seconds:g} s")
        result = await load("ceiling")
        say("throughput ceiling: the same load under py-spy")
        profiling = asyncio.create_task(
            profile_during(app.pid, bench.seconds, bench.logs / "py-spy.txt")
        )
        await load("ceiling-profiled")
        report.profile = await profiling
    floor = health.rate if health is not None else 0.0
    report.rows += [
        Row(
            f"ceiling: offline runs/s (2xx/s), {CONNECTIONS} conn",
            per_second(result.ok_rate),
            f"/health {per_second(floor)}" if floor else "—",
            ratio(result.ok_rate, floor),
        ),
        Row("ceiling: p50 / p99", f"{ms(result.p50_ms / 1000)} / {ms(result.p99_ms / 1000)}"),
        Row(
            "ceiling: non-2xx",
            non2xx_text(result.non2xx, result.requests, result.statuses),
            "0",
        ),
    ]


async def measure(bench: Bench, phases: set[str]) -> Report:
    report = Report()

    async def attempt(name: str, phase: Awaitable[object]) -> None:
        # A phase that breaks is reported in the table; the others still run.
        try:
            await phase
        except Exception as error:
            say(f"{name} failed: {error}")
            first = str(error).strip().splitlines()
            report.rows.append(Row(f"{name}: FAILED", (first[0] if first else repr(error))[:80]))

    health: WrkResult | None = None
    if "main" in phases:
        try:
            health = await storm_and_critical(bench, report)
        except Exception as error:
            say(f"main failed: {error}")
            report.rows.append(Row("main: FAILED", str(error).strip()[:80]))
    if "sequential" in phases:
        await attempt("sequential", sequential_reference(bench, report))
    if "at-once" in phases:
        for count in bench.at_once:
            await attempt(f"{count} at once", at_once(bench, report, count))
    if "verify" in phases:
        await attempt("verify", token_verification(bench, report))
    if "cold" in phases:
        await attempt("cold", cold_start(bench, report))
    if "ceiling" in phases:
        await attempt("ceiling", ceiling(bench, report, health))
    return report


# --- output ------------------------------------------------------------------------------------

HEADINGS = ("measure", "figure", "floor", "ratio", "target")


def render_text(header: list[tuple[str, str]], report: Report) -> str:
    lines = [f"{name + ':':<12} {value}" for name, value in header]
    cells = [HEADINGS] + [
        (row.measure, row.figure, row.floor, row.ratio, row.target) for row in report.rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADINGS))]
    lines.append("")
    for index, line in enumerate(cells):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines += profile_lines(report.profile, markdown=False)
    lines += ["", *report.notes] if report.notes else []
    return "\n".join(line.rstrip() for line in lines)


def render_markdown(header: list[tuple[str, str]], report: Report) -> str:
    lines = [f"- **{name}**: {value}" for name, value in header]
    lines += ["", "| " + " | ".join(HEADINGS) + " |", "|" + "---|" * len(HEADINGS)]
    for row in report.rows:
        cells = (row.measure, row.figure, row.floor, row.ratio, row.target)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += profile_lines(report.profile, markdown=True)
    lines += ["", *(f"- {note}" for note in report.notes)] if report.notes else []
    return "\n".join(lines)


def profile_lines(profile: Profile | None, markdown: bool) -> list[str]:
    if profile is None:
        return []
    title = "ceiling profile (py-spy, offline load)"
    if profile.error is not None:
        return ["", f"{title}: not measured, {profile.error}"]
    lines: list[str] = []
    for heading, entries in (
        ("top five functions by own samples", profile.top),
        ("top five app/ functions by total samples (own + callees)", profile.top_app),
    ):
        lines += ["", f"{title}, {heading} (of {profile.samples} samples):"]
        if markdown:
            lines.append("")
        for rank, (function, samples) in enumerate(entries, start=1):
            share = f"{100 * samples / profile.samples:4.1f} %" if profile.samples else "—"
            lines.append(f"{rank}. {share} `{function}`" if markdown else f"  {share}  {function}")
    return lines


# --- command line ------------------------------------------------------------------------------


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--app-env takes NAME=VALUE, not {pair!r}")
        env[name.upper()] = value
    return env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--seconds", type=float, default=5.0, help="each wrk load (default 5)")
    parser.add_argument("--runs", type=int, default=5, help="critical-path runs (default 5)")
    parser.add_argument(
        "--at-once", type=int, nargs="+", default=[100, 500], help="runs delivered at once"
    )
    parser.add_argument(
        "--deadline", type=float, default=60.0, help="bound of each at-once phase (default 60 s)"
    )
    parser.add_argument(
        "--app-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra app setting for every app process (also BENCH_APP_ENV='A=1 B=2')",
    )
    parser.add_argument("--only", default=",".join(PHASES), help=f"phases, of {','.join(PHASES)}")
    parser.add_argument("--keep-logs", action="store_true", help="keep the app logs and profile")
    args = parser.parse_args(argv)
    phases = {name.strip() for name in args.only.split(",") if name.strip()}
    if unknown := phases - set(PHASES):
        parser.error(f"unknown phases: {', '.join(sorted(unknown))}")
    extra_env = parse_env(os.environ.get("BENCH_APP_ENV", "").split() + args.app_env)

    ensure_wrk()
    logs = scratch_directory()
    signer = Signer.generate()
    fake = FakeOpenAI().start()
    try:
        header = machine_description()
        with certs_server(signer) as certs_url, scratch_database() as database:
            bench = Bench(
                database=database,
                fake=fake,
                signer=signer,
                certs_url=certs_url,
                logs=logs,
                extra_env=extra_env,
                seconds=args.seconds,
                runs=args.runs,
                at_once=args.at_once,
                deadline=args.deadline,
            )
            app_settings = ", ".join(f"{n}={setting(bench.env(), n)}" for n in SHOWN_SETTINGS)
            header.append(("app", app_settings))
            if extra_env:
                header.append(("--app-env", " ".join(f"{k}={v}" for k, v in extra_env.items())))
            started = time.perf_counter()
            report = asyncio.run(measure(bench, phases))
            header.append(("bench took", f"{time.perf_counter() - started:.0f} s"))
    finally:
        fake.stop()
        if args.keep_logs:
            say(f"logs kept in {logs}")
        else:
            shutil.rmtree(logs, ignore_errors=True)
    render = render_markdown if args.markdown else render_text
    print(render(header, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
