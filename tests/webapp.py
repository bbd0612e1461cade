"""The reference web app served by scripts/reference_webapp.sh, and what a browser saw of it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.async_api import ConsoleMessage, Request, Response

from tests.procs import ROOT, free_port, wait_for_http

SCRIPT = ROOT / "scripts" / "reference_webapp.sh"
WEBAPP_SOURCES = Path(
    os.environ.get("REFERENCE_WEBAPP_SRC", ROOT.parent / "shared" / "reference" / "webapp")
)
# Chromium as root in a container, with nothing reaching out on its own: the machine's network
# is closed, and every host name but loopback's fails to resolve.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]


def require(what: str, found: str | None, install: str) -> str:
    """`found`, or skip loudly (fail under CI=true, where .ci/run installs what is missing)."""
    if found:
        return found
    reason = f"!!! reference web app walk NOT RUN: {what} is missing ({install})"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def chromium() -> str:
    candidates = [os.environ.get("CHROMIUM_PATH"), shutil.which("chromium"), "/usr/bin/chromium"]
    found = next((c for c in candidates if c and Path(c).is_file()), None)
    return require("Chromium", found, "Debian: apt-get install -y chromium; or set CHROMIUM_PATH")


def npm() -> str:
    return require("npm", shutil.which("npm"), "Debian: apt-get install -y nodejs npm")


class WebApp:
    """scripts/reference_webapp.sh serving the web app, built against `api_url`, on a free port.

    Its own process group, so stopping it also stops an `npm ci` or build still under way.
    """

    def __init__(self, api_url: str, log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = api_url
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def origin(self) -> str:
        return self.url

    def start(self, timeout: float) -> WebApp:
        """Install, build (both cached by the script) and serve; wait until the page answers."""
        with self._log_path.open("ab") as log:
            self._process = subprocess.Popen(
                ["bash", str(SCRIPT), self.api_url],
                cwd=ROOT,
                env={
                    **os.environ,
                    "WEBAPP_HOST": "127.0.0.1",
                    "WEBAPP_PORT": str(self.port),
                    "REFERENCE_WEBAPP_SRC": str(WEBAPP_SOURCES),
                },
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for_http(self._process, f"{self.url}/", timeout, self.log)
        return self

    def log(self) -> str:
        return self._log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        group = self._process.pid  # its own session: the group id is its pid
        os.killpg(group, signal.SIGTERM)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self._process.wait(timeout=10)


def is_loopback(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about", "chrome", "devtools"):
        return True
    host = parts.hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


@dataclass
class BrowserLog:
    """What a person with the developer tools open would have seen: console, failures, 4xx/5xx."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    off_loopback: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        line = f"console.{message.type}: {message.text}"
        self.lines.append(line)
        if message.type == "error":
            self.problems.append(line)

    def on_request(self, request: Request) -> None:
        self.lines.append(f"-> {request.method} {request.url}")
        if not is_loopback(request.url):
            self.off_loopback.append(request.url)

    def on_request_failed(self, request: Request) -> None:
        line = f"request failed: {request.method} {request.url}: {request.failure}"
        self.lines.append(line)
        self.problems.append(line)

    async def on_response(self, response: Response) -> None:
        line = f"<- {response.status} {response.request.method} {response.url}"
        self.lines.append(line)
        if response.status >= 400:
            try:
                body = (await response.text())[:2000]
            except Exception as error:  # the page may have moved on; keep what is known
                body = f"(body unreadable: {error})"
            self.problems.append(f"{line}\n   {body}")

    def report(self) -> str:
        return "\n".join(self.problems) or "(no console errors, failed requests or 4xx/5xx)"

    def write(self, path: Path) -> None:
        path.write_text("\n".join(self.lines) + "\n")
