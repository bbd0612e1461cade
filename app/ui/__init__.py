"""The run viewer: server-rendered pages over the same code as `/v1`, with live progress.

`install_ui(app)` adds the pages, their static files and the security headers every response
carries. Model output is untrusted text: templates escape everything, and the
Content-Security-Policy allows no inline script or style, so even a missed escape cannot run.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.ui.routes import router

STATIC_DIR = Path(__file__).parent / "static"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode("ascii")),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
)


def install_ui(app: FastAPI) -> None:
    """Serve the run viewer's pages and `/static`; security headers on every response."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(router)
    app.add_middleware(SecurityHeadersMiddleware)


class SecurityHeadersMiddleware:
    """CSP, nosniff and the referrer policy on every answer (pages, static files, errors).

    Plain ASGI rather than BaseHTTPMiddleware, so the event stream is passed through unbuffered.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"].extend(_SECURITY_HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_headers)
