"""A fake OpenAI-compatible Responses API on loopback, driven over real HTTP by the real SDK.

Tests script it per step: scores and blocking issues per persona, queued one-off replies
(429 with Retry-After, 500, garbage, refusal), and delays; `outage()` makes every request get
one error reply until it is ended. It records every request with its arrival time.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

USAGE = {"input_tokens": 100, "output_tokens": 50, "total_tokens": 150}


@dataclass
class Reply:
    """A scripted reply: an HTTP status with a JSON body, or `raw_text` as the model's output."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    raw_text: str | None = None
    refusal: str | None = None
    incomplete_reason: str | None = None
    delay: float = 0.0


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float = field(default_factory=time.time)  # arrival, wall clock (seconds since epoch)

    @property
    def client_request_id(self) -> str:
        return self.headers.get("x-client-request-id", "")

    @property
    def step(self) -> str:
        parts = self.client_request_id.split("/")
        return parts[1] if len(parts) == 3 else ""


class FakeOpenAI:
    """Start with `start()`, stop with `stop()`; `url` is the SDK's base_url."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[Recorded] = []
        self.scores: dict[str, float] = {}
        self.blocking: dict[str, list[dict[str, Any]]] = {}
        self.step_delay: dict[str, float] = {}
        self._queued: dict[str, deque[Reply]] = defaultdict(deque)
        self._outage: Reply | None = None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- scripting -------------------------------------------------------------------

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.scores.clear()
            self.blocking.clear()
            self.step_delay.clear()
            self._queued.clear()
            self._outage = None

    def queue(self, step: str, *replies: Reply) -> None:
        """Replies used, in order, by the next calls for `step` (then the default reply)."""
        with self._lock:
            self._queued[step].extend(replies)

    def outage(
        self,
        status: int | None,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Every request, of any step, gets this error reply until `outage(None)` ends it.

        It takes precedence over queued replies, which wait until the outage ends.
        """
        with self._lock:
            if status is None:
                self._outage = None
            else:
                self._outage = Reply(status, headers=dict(headers or {}), body=body)

    def calls(self, step: str | None = None) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if step is None or r.step == step]

    # --- serving ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in two writes; without TCP_NODELAY the body waits for the
            # client's delayed ACK (up to 40 ms), latency no real provider adds.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                raw = self.rfile.read(length)
                body = json.loads(raw) if raw else {}
                headers = {k.lower(): v for k, v in self.headers.items()}
                recorded = Recorded(self.path, headers, body)
                reply = fake._take(recorded)
                delay = reply.delay or fake.step_delay.get(recorded.step, 0.0)
                if delay:
                    time.sleep(delay)
                status, payload, extra = fake._render(recorded, reply)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for key, value in extra.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _take(self, recorded: Recorded) -> Reply:
        with self._lock:
            self.requests.append(recorded)
            if self._outage is not None:
                return self._outage
            queue = self._queued.get(recorded.step)
            return queue.popleft() if queue else Reply()

    def _render(self, recorded: Recorded, reply: Reply) -> tuple[int, Any, dict[str, str]]:
        if reply.status != 200:
            body = reply.body or {
                "error": {"message": f"scripted {reply.status}", "type": "server_error"}
            }
            return reply.status, body, reply.headers
        if reply.body is not None:
            return 200, reply.body, reply.headers
        content: dict[str, Any]
        if reply.refusal is not None:
            content = {"type": "refusal", "refusal": reply.refusal}
        else:
            text = reply.raw_text if reply.raw_text is not None else self._output(recorded)
            content = {"type": "output_text", "text": text, "annotations": []}
        return 200, response_body(recorded, content, reply.incomplete_reason), reply.headers

    def _output(self, recorded: Recorded) -> str:
        step = recorded.step
        if step == "expand":
            return json.dumps(
                {
                    "title": "Shared grocery list",
                    "summary": "A list a household edits together.",
                    "problem_statement": "Households forget items.",
                    "proposed_solution": "A synced list with per-item owners.",
                    "assumptions": ["Members have phones"],
                    "scope_non_goals": ["Payments"],
                }
            )
        persona = step.removeprefix("review_")
        return json.dumps(
            {
                "confidence_score": self.scores.get(persona, 0.85),
                "strengths": [f"{persona} likes it"],
                "concerns": [{"text": f"{persona} worries", "is_blocking": False}],
                "blocking_issues": self.blocking.get(persona, []),
                "recommendations": [f"{persona} recommends a pilot"],
                "estimated_effort": "medium",
                "dependency_risks": [],
            }
        )


def response_body(
    recorded: Recorded, content: dict[str, Any], incomplete_reason: str | None = None
) -> dict[str, Any]:
    """A Responses API object as OpenAI returns it."""
    return {
        "id": "resp_fake",
        "object": "response",
        "created_at": int(time.time()),
        "status": "incomplete" if incomplete_reason else "completed",
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "error": None,
        "model": recorded.body.get("model", "fake-model"),
        "output": [
            {
                "type": "message",
                "id": "msg_fake",
                "status": "completed",
                "role": "assistant",
                "content": [content],
            }
        ],
        "usage": {
            **USAGE,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "instructions": None,
        "metadata": {},
        "temperature": recorded.body.get("temperature"),
        "top_p": 1.0,
    }
