"""The real Pub/Sub emulator, started directly (not through `gcloud beta emulators`)."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx2
import pytest

from tests.procs import free_port, wait_for_http

KNOWN_LAUNCHER = Path(
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
)
PROJECT = "test-project"


def launcher() -> str:
    """The emulator's launcher; skip loudly where it is missing, fail under CI."""
    found = shutil.which("cloud-pubsub-emulator") or (
        str(KNOWN_LAUNCHER) if KNOWN_LAUNCHER.exists() else None
    )
    if found is None:
        reason = (
            "Pub/Sub emulator not found: install the Debian package "
            "google-cloud-cli-pubsub-emulator (it provides bin/cloud-pubsub-emulator)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


class PubSubEmulator:
    """One emulator process on a loopback port, with REST helpers for topics and messages."""

    def __init__(self, log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.host = f"127.0.0.1:{self.port}"
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> PubSubEmulator:
        log = self._log_path.open("ab")
        # Its own session, so stopping it also stops the Java process the launcher starts.
        self._process = subprocess.Popen(
            [launcher(), "--host=127.0.0.1", f"--port={self.port}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for_http(self._process, f"http://{self.host}/", timeout, self._log_path.read_text)
        return self

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=10)

    def _put(self, path: str, body: dict[str, object] | None = None) -> None:
        response = httpx2.put(f"http://{self.host}/v1/{path}", json=body or {}, timeout=10)
        if response.status_code not in (200, 409):
            raise RuntimeError(f"PUT {path}: {response.status_code} {response.text}")

    def create_topic(self, topic: str) -> None:
        self._put(f"projects/{PROJECT}/topics/{topic}")

    def create_push_subscription(
        self, subscription: str, topic: str, endpoint: str, ack_deadline: int = 60
    ) -> None:
        self._put(
            f"projects/{PROJECT}/subscriptions/{subscription}",
            {
                "topic": f"projects/{PROJECT}/topics/{topic}",
                "ackDeadlineSeconds": ack_deadline,
                "pushConfig": {"pushEndpoint": endpoint},
            },
        )

    def create_push_topology(self, topic: str, endpoint: str, ack_deadline: int = 60) -> str:
        """The topic and a push subscription `<topic>-sub` to `endpoint`; returns its name."""
        self.create_topic(topic)
        self.create_push_subscription(f"{topic}-sub", topic, endpoint, ack_deadline)
        return f"projects/{PROJECT}/subscriptions/{topic}-sub"

    def publish(self, topic: str, payloads: list[bytes]) -> list[str]:
        messages = [{"data": base64.b64encode(p).decode()} for p in payloads]
        response = httpx2.post(
            f"http://{self.host}/v1/projects/{PROJECT}/topics/{topic}:publish",
            json={"messages": messages},
            timeout=10,
        )
        response.raise_for_status()
        ids: list[str] = response.json()["messageIds"]
        return ids
