"""The parts `make bench` runs: a scratch database, a certificates server and token signer, the
app as a uvicorn process, wrk, a sampler of the app's database connections, the machine."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
import jwt
from alembic import command
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from app.settings import Settings
from app.store.db import alembic_config

ROOT = Path(__file__).resolve().parents[1]
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk" / "requests.lua"
ISSUER = "https://accounts.google.com"
KID = "bench-key"


def say(message: str) -> None:
    """Progress goes to stderr, so stdout holds only the table."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- the database ------------------------------------------------------------------------------


def admin_dsn() -> str:
    default = os.environ.get("TEST_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    return os.environ.get("BENCH_PG_ADMIN_DSN", default)


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(admin_dsn(), timeout=10)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@dataclass(frozen=True)
class Database:
    name: str
    dsn: str  # for asyncpg
    url: str  # for the app (SQLAlchemy + asyncpg)


@contextmanager
def scratch_database() -> Iterator[Database]:
    """A fresh PostgreSQL database at the current migration; dropped afterwards, even on error."""
    name = f"ce_bench_{uuid.uuid4().hex[:10]}"
    base = admin_dsn().rsplit("/", 1)[0]
    database = Database(
        name=name,
        dsn=f"{base}/{name}",
        url=f"{base.replace('postgresql://', 'postgresql+asyncpg://', 1)}/{name}",
    )
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        command.upgrade(alembic_config(database.url), "head")
        yield database
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def server_version() -> str:
    connection = await asyncpg.connect(admin_dsn(), timeout=10)
    try:
        version: str = await connection.fetchval("SHOW server_version")
        return version
    finally:
        await connection.close()


async def run_statuses(database: Database, source_prefix: str) -> dict[str, int]:
    """How many runs of the pushes whose source key starts with `source_prefix`, by status."""
    connection = await asyncpg.connect(database.dsn, timeout=10)
    try:
        rows = await connection.fetch(
            "SELECT status, count(*) AS n FROM runs WHERE source_key LIKE $1 GROUP BY status",
            source_prefix.replace("%", r"\%").replace("_", r"\_") + "%",
        )
        return {str(row["status"]): int(row["n"]) for row in rows}
    finally:
        await connection.close()


async def empty_runs(database: Database) -> None:
    """Remove every run, so a new app process does not pick up work an earlier phase left
    unfinished (its start-up relay would deliver it in-process and skew the next figure)."""
    connection = await asyncpg.connect(database.dsn, timeout=10)
    try:
        await connection.execute("TRUNCATE runs CASCADE")
    finally:
        await connection.close()


@dataclass
class ConnectionSample:
    max_open: int = 0
    opened: int = 0  # backends that appeared during the sampling


class ConnectionSampler:
    """Samples the app's open connections (pg_stat_activity) every 50 ms while active.

    It connects to the admin database, so its own connection is never counted.
    """

    def __init__(self, database: Database, interval: float = 0.05) -> None:
        self._database = database
        self._interval = interval
        self.sample = ConnectionSample()

    @asynccontextmanager
    async def active(self) -> AsyncIterator[ConnectionSample]:
        connection = await asyncpg.connect(admin_dsn(), timeout=10)
        stop = asyncio.Event()
        try:
            before = await self._backends(connection)
            seen = set(before)

            async def loop() -> None:
                while not stop.is_set():
                    backends = await self._backends(connection)
                    seen.update(backends)
                    self.sample.max_open = max(self.sample.max_open, len(backends))
                    with suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self._interval)

            task = asyncio.create_task(loop())
            try:
                yield self.sample
            finally:
                stop.set()
                await task
                self.sample.opened = len(seen - before)
        finally:
            await connection.close()

    async def _backends(self, connection: asyncpg.Connection) -> set[tuple[int, Any]]:
        rows = await connection.fetch(
            "SELECT pid, backend_start FROM pg_stat_activity WHERE datname = $1",
            self._database.name,
        )
        return {(int(row["pid"]), row["backend_start"]) for row in rows}


# --- Google-style OIDC: a signing key, its certificate served like Google's ------------------


@dataclass(frozen=True)
class Signer:
    private: rsa.RSAPrivateKey
    certificate_pem: str

    @classmethod
    def generate(cls) -> Signer:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-signer")])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(private, hashes.SHA256())
        )
        pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
        return cls(private=private, certificate_pem=pem)

    def token(self, audience: str, email: str, nonce: str | None = None) -> str:
        """An ID token as Google signs it; `nonce` makes it differ from others of this second."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": audience,
            "sub": "1234567890",
            "email": email,
            "email_verified": True,
            "iat": now,
            "exp": now + 3600,
        }
        if nonce is not None:
            claims["jti"] = nonce
        return jwt.encode(claims, self.private, algorithm="RS256", headers={"kid": KID})


@contextmanager
def certs_server(signer: Signer) -> Iterator[str]:
    """Serves `{kid: PEM}` as Google's v1 certificates endpoint does; yields its URL."""
    document = json.dumps({KID: signer.certificate_pem}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Cache-Control", "public, max-age=3600, must-revalidate")
            self.send_header("Content-Length", str(len(document)))
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/certs"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- the app as a uvicorn process --------------------------------------------------------------


def app_environment(overrides: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any app setting, then `overrides`.

    Settings the caller's shell happens to export (DATABASE_URL, PUBSUB_PROJECT_ID, ...) would
    otherwise leak into the app under measurement.
    """
    names = {name.upper() for name in Settings.model_fields}
    env = {key: value for key, value in os.environ.items() if key.upper() not in names}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(overrides)
    return env


def setting(env: Mapping[str, str], name: str) -> str:
    """The value the app will use for `name`: from `env`, else the Settings default."""
    if name in env:
        return env[name]
    return str(Settings.model_fields[name.lower()].default)


class AppProcess:
    """`python -m uvicorn app.main:app` on a free loopback port, run from a scratch directory
    (so no `.env` file is read) with its output in `log_path`."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = app_environment(env)
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> float:
        """Start, wait for `GET /ready` 200; return the seconds from process start to it."""
        workdir = self._log_path.parent
        with self._log_path.open("ab") as log:
            started = time.perf_counter()
            self._process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1"),
                    *("--port", str(self.port), "--timeout-graceful-shutdown", "5"),
                ],
                cwd=workdir,
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = started + timeout
        with httpx2.Client(timeout=2.0) as client:
            while time.perf_counter() < deadline:
                if self._process.poll() is not None:
                    raise RuntimeError(f"the app exited during start-up:\n{self.log()[-3000:]}")
                with suppress(httpx2.HTTPError):
                    if client.get(f"{self.url}/ready").status_code == 200:
                        return time.perf_counter() - started
                time.sleep(0.01)
        raise RuntimeError(f"/ready not 200 within {timeout:g}s:\n{self.log()[-3000:]}")

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")

    def memory_kib(self, field_name: str) -> int | None:
        """`VmRSS` (now) or `VmHWM` (peak) of the process from /proc, in KiB."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{field_name}:\s+(\d+) kB", status, re.MULTILINE)
        return int(match.group(1)) if match else None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)


# --- wrk ---------------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """wrk's path; installed with apt-get when missing and root, else exits with what to do."""
    path = shutil.which("wrk")
    if path is not None:
        return path
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        say("wrk is missing: apt-get install -y wrk")
        apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        installed = subprocess.run(["apt-get", "install", "-y", "wrk"], env=apt_env, check=False)
        if installed.returncode != 0:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update"], env=apt_env, check=False)
            subprocess.run(["apt-get", "install", "-y", "wrk"], env=apt_env, check=False)
        path = shutil.which("wrk")
        if path is not None:
            return path
    sys.exit(
        "make bench needs wrk, the HTTP load generator: install the Debian/Ubuntu package "
        "`wrk` (sudo apt-get install wrk; macOS: brew install wrk), then run make bench again"
    )


def wrk_version() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        return "missing"
    result = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    first = (result.stdout or result.stderr).splitlines()
    return first[0].split(" Copyright")[0] if first else "unknown"


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def ok_rate(self) -> float:
        """2xx answers per second."""
        return (self.requests - self.non2xx) / self.seconds if self.seconds else 0.0


async def run_wrk(
    url: str,
    *,
    connections: int,
    seconds: float,
    method: str = "GET",
    body: str | None = None,
    authorization: str | None = None,
    id_mark: str | None = None,
    id_prefix: str | None = None,
) -> WrkResult:
    """One bounded wrk load against `url` with benchmarks/wrk/requests.lua."""
    threads = max(1, min(os.cpu_count() or 1, connections, 4))
    env = {**os.environ, "BENCH_METHOD": method}
    for name, value in (
        ("BENCH_BODY", body),
        ("BENCH_AUTHORIZATION", authorization),
        ("BENCH_ID_MARK", id_mark),
        ("BENCH_ID_PREFIX", id_prefix),
    ):
        if value is not None:
            env[name] = value
    args = [ensure_wrk(), "-t", str(threads), "-c", str(connections)]
    args += ["-d", f"{max(1, round(seconds))}s", "--timeout", "10s", "--latency"]
    args += ["-s", str(WRK_SCRIPT), url]
    process = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), seconds + 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = stdout.decode(errors="replace")
    match = re.search(r"^BENCH_RESULT (.*)$", text, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk gave no summary:\n{text[-2000:]}\n{stderr.decode()[-2000:]}")
    summary: dict[str, Any] = json.loads(match.group(1))
    errors = sum(
        int(summary[name]) for name in ("connect_errors", "read_errors", "write_errors", "timeouts")
    )
    return WrkResult(
        requests=int(summary["requests"]),
        seconds=int(summary["duration_us"]) / 1e6,
        p50_ms=int(summary["p50_us"]) / 1000,
        p99_ms=int(summary["p99_us"]) / 1000,
        non2xx=int(summary["non2xx"]),
        socket_errors=errors,
        statuses={str(k): int(v) for k, v in summary["statuses"].items()},
    )


# --- py-spy ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    samples: int
    top: list[tuple[str, int]]  # (function (file), own samples), most first
    top_app: list[tuple[str, int]] = field(default_factory=list)  # app/ functions, total samples
    error: str | None = None


def py_spy_command(pid: int, seconds: float, output: Path) -> list[str] | None:
    executable = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which(
        "py-spy"
    )
    if executable is None:
        return None
    # --nonblocking: sampling without pausing the app, so the profile costs it little.
    return [
        *(executable, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))),
        *("--rate", "200", "--format", "raw", "--nonblocking", "--output", str(output)),
    ]


async def profile_during(pid: int, seconds: float, output: Path) -> Profile:
    """`py-spy record` on `pid` for `seconds`; the top five functions by own (leaf) samples."""
    args = py_spy_command(pid, seconds, output)
    if args is None:
        return Profile(0, [], error="py-spy is not installed (pip install -e '.[dev]')")
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), seconds + 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    try:
        collapsed = await asyncio.to_thread(output.read_text, errors="replace")
    except OSError:
        collapsed = None
    if process.returncode != 0 or collapsed is None:
        reason = stderr.decode(errors="replace").strip().splitlines()
        return Profile(0, [], error=f"py-spy could not attach: {reason[-1] if reason else '?'}")
    return parse_collapsed(collapsed)


def parse_collapsed(text: str) -> Profile:
    """From collapsed stacks (`frame;frame;leaf count` lines): own samples per function, and
    total samples (own and callees') of the app's own functions, which say where to look."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [function_name(frame) for frame in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + int(count)
        for frame in set(frames):
            if frame.endswith(".py)") and "(app/" in frame:
                inclusive[frame] = inclusive.get(frame, 0) + int(count)
        total += int(count)
    return Profile(total, _top(own), _top(inclusive))


def _top(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: item[1], reverse=True)[:5]


def function_name(frame: str) -> str:
    """py-spy's "name (path/file.py:123)" as "name (file.py)": one entry per function."""
    match = re.fullmatch(r"(.*) \((.*?):\d+\)", frame)
    return f"{match.group(1)} ({shorten(match.group(2))})" if match else frame


def shorten(path: str) -> str:
    """A source path relative to the repository or to site-packages."""
    for anchor in (str(ROOT) + os.sep, "site-packages" + os.sep, "lib/python3"):
        if anchor in path:
            return path.split(anchor, 1)[1].lstrip(os.sep)
    return path


# --- the machine -------------------------------------------------------------------------------


def machine_description() -> list[tuple[str, str]]:
    cpu = platform.processor() or platform.machine()
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with suppress(OSError):
        match = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        if match is not None:
            memory = f"{int(match.group(1)) / 1024 / 1024:.1f} GiB"
    return [
        ("CPU", f"{cpu}, {os.cpu_count()} cores"),
        ("memory", memory),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version()),
        ("PostgreSQL", asyncio.run(server_version())),
        ("wrk", wrk_version()),
    ]


def listen_overflows() -> int:
    """The kernel's count of TCP listen-queue overflows (`TcpExt: ListenOverflows`), all sockets."""
    with suppress(OSError, ValueError):
        lines = Path("/proc/net/netstat").read_text().splitlines()
        for names, values in zip(lines[::2], lines[1::2], strict=False):
            if names.startswith("TcpExt:"):
                table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
                return int(table.get("ListenOverflows", "0"))
    return 0


def scratch_directory() -> Path:
    return Path(tempfile.mkdtemp(prefix="ce-bench-"))
