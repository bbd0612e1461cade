"""Push authentication (SPEC §3.3) against real RS256 tokens and a local certificates server."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from google.auth import jwt as google_jwt
from loguru import logger

from app.auth import (
    CLOCK_SKEW_SECONDS,
    AuthError,
    CloudRunIamAuthenticator,
    NoAuthenticator,
    OidcAuthenticator,
    build_api_authenticator,
    build_authenticator,
)
from app.push.envelope import encode_wrapped
from app.settings import Settings
from tests.conftest import running_app, services_of
from tests.fakes.openai_server import FakeOpenAI

AUDIENCE = "https://consensus-engine.example.run.app/push"
PUSHER = "pubsub-pusher@project.iam.gserviceaccount.com"
OTHER = "someone-else@project.iam.gserviceaccount.com"
KID = "key-1"
SERVICE_URL = "https://consensus-engine-123456789.europe-west1.run.app"
# The `aud` of `gcloud auth print-identity-token` without --audiences (gcloud's OAuth client).
GCLOUD_AUDIENCE = "32555940559.apps.googleusercontent.com"
MAX_AGE = 120


@dataclass(frozen=True)
class SigningKey:
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    certificate_pem: str


def _make_key(kind: str = "rsa") -> SigningKey:
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if kind == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-signer")])
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
    return SigningKey(private=private, certificate_pem=pem)


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return _make_key()


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    return _make_key()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "https://accounts.google.com",
        "aud": AUDIENCE,
        "sub": "1234567890",
        "email": PUSHER,
        "email_verified": True,
        "iat": now,
        "exp": now + 3600,
        # Unique, so two tokens signed in the same second differ (verified ones are remembered).
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    return {name: value for name, value in claims.items() if value is not None}


def _sign(key: SigningKey, kid: str | None = KID, algorithm: str = "RS256", **claims: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return pyjwt.encode(_claims(**claims), key.private, algorithm=algorithm, headers=headers)


def _bearer(token: str) -> str:
    return f"Bearer {token}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(document: dict[str, Any]) -> str:
    return _b64(json.dumps(document).encode())


# --- the certificates server ---------------------------------------------------------------


@dataclass
class CertsServer:
    """What the local certificates endpoint answers, and how often it was asked."""

    certs: dict[str, str] = field(default_factory=dict)
    max_age: int | None = MAX_AGE
    status: int = 200
    body: bytes | None = None  # overrides the JSON document when set
    drop: bool = False  # close the connection without answering, as an unreachable endpoint
    delay: float = 0.0
    fetches: int = 0
    url: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.fetches += 1
        time.sleep(self.delay)
        headers = {"Content-Type": "application/json"}
        if self.max_age is not None:
            headers["Cache-Control"] = f"public, max-age={self.max_age}, must-revalidate"
        body = self.body if self.body is not None else json.dumps(self.certs).encode()
        return self.status, headers, body


def _handler_for(state: CertsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, headers, body = state.answer()
            if state.drop:
                self.close_connection = True
                return
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Keep the test output quiet."""

    return Handler


@contextmanager
def serving(state: CertsServer, path: str) -> Iterator[CertsServer]:
    """`state` answered on a loopback port at `path` (its `url`) until the block ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(state))
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}{path}"
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def certs_server(key: SigningKey) -> Iterator[CertsServer]:
    with serving(CertsServer(certs={KID: key.certificate_pem}), "/oauth2/v1/certs") as state:
        yield state


class FakeClock:
    """Monotonic clock the cache reads; moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


MakeOidc = Callable[..., OidcAuthenticator]


@pytest.fixture
async def make_oidc(certs_server: CertsServer, clock: FakeClock) -> AsyncIterator[MakeOidc]:
    made: list[OidcAuthenticator] = []

    def make(**overrides: Any) -> OidcAuthenticator:
        options: dict[str, Any] = {
            "audience": AUDIENCE,
            "service_accounts": [PUSHER],
            "certs_url": certs_server.url,
            "clock": clock,
            "fetch_timeout": 2.0,
        }
        options.update(overrides)
        authenticator = OidcAuthenticator(**options)
        made.append(authenticator)
        return authenticator

    yield make
    for authenticator in made:
        await authenticator.aclose()


@pytest.fixture
def oidc(make_oidc: MakeOidc) -> OidcAuthenticator:
    return make_oidc()


async def _rejected(call: Awaitable[object], status: int) -> AuthError:
    with pytest.raises(AuthError) as caught:
        await call
    assert caught.value.status == status
    assert (
        caught.value.code
        == {401: "unauthorized", 403: "forbidden", 503: "auth_unavailable"}[status]
    )
    return caught.value


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- oidc: accepted tokens -----------------------------------------------------------------


@pytest.mark.parametrize("issuer", ["accounts.google.com", "https://accounts.google.com"])
async def test_valid_token_returns_the_email(
    oidc: OidcAuthenticator, key: SigningKey, certs_server: CertsServer, issuer: str
) -> None:
    assert await oidc.verify(_bearer(_sign(key, iss=issuer))) == PUSHER
    assert certs_server.fetches == 1


async def test_any_verified_account_accepted_when_the_list_is_empty(
    make_oidc: MakeOidc, key: SigningKey
) -> None:
    oidc = make_oidc(service_accounts=[])
    assert await oidc.verify(_bearer(_sign(key, email=OTHER))) == OTHER


async def test_allow_list_ignores_case_and_spaces(make_oidc: MakeOidc, key: SigningKey) -> None:
    oidc = make_oidc(service_accounts=[f"  {PUSHER.upper()} "])
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER


async def test_lowercase_bearer_scheme_accepted(oidc: OidcAuthenticator, key: SigningKey) -> None:
    assert await oidc.verify("bearer  " + _sign(key)) == PUSHER


# --- oidc: rejected tokens -----------------------------------------------------------------


async def test_missing_header_is_401(oidc: OidcAuthenticator, certs_server: CertsServer) -> None:
    await _rejected(oidc.verify(None), 401)
    await _rejected(oidc.verify(""), 401)
    assert certs_server.fetches == 0


# "{token}" stands for a valid token: the scheme alone must be enough to refuse it.
@pytest.mark.parametrize(
    "header", ["Basic {token}", "Token {token}", "{token}", "Bearer", "Bearer ", "Bearer a b"]
)
async def test_non_bearer_header_is_401(
    oidc: OidcAuthenticator, key: SigningKey, certs_server: CertsServer, header: str
) -> None:
    await _rejected(oidc.verify(header.format(token=_sign(key))), 401)
    assert certs_server.fetches == 0


async def test_garbage_token_is_401(oidc: OidcAuthenticator) -> None:
    await _rejected(oidc.verify("Bearer not-a-jwt"), 401)


async def test_expired_token_is_401(oidc: OidcAuthenticator, key: SigningKey) -> None:
    now = int(time.time())
    token = _sign(key, iat=now - 3700, exp=now - 60)
    await _rejected(oidc.verify(_bearer(token)), 401)


async def test_expired_within_the_skew_is_accepted(
    oidc: OidcAuthenticator, key: SigningKey
) -> None:
    now = int(time.time())
    token = _sign(key, iat=now - 3600, exp=now - 3)
    assert await oidc.verify(_bearer(token)) == PUSHER


async def test_not_yet_valid_beyond_the_skew_is_401(
    oidc: OidcAuthenticator, key: SigningKey
) -> None:
    now = int(time.time())
    await _rejected(oidc.verify(_bearer(_sign(key, iat=now + 60, exp=now + 3660))), 401)


async def test_not_yet_valid_within_the_skew_is_accepted(
    oidc: OidcAuthenticator, key: SigningKey
) -> None:
    now = int(time.time())
    assert await oidc.verify(_bearer(_sign(key, iat=now + 5, exp=now + 3605))) == PUSHER


async def test_nbf_beyond_the_skew_is_401(oidc: OidcAuthenticator, key: SigningKey) -> None:
    await _rejected(oidc.verify(_bearer(_sign(key, nbf=int(time.time()) + 60))), 401)


async def test_wrong_audience_is_401(oidc: OidcAuthenticator, key: SigningKey) -> None:
    token = _sign(key, aud="https://another-service.example.run.app/push")
    await _rejected(oidc.verify(_bearer(token)), 401)


@pytest.mark.parametrize("issuer", ["https://evil.example.com", "accounts.google.com.evil", None])
async def test_wrong_issuer_is_401(
    oidc: OidcAuthenticator, key: SigningKey, issuer: str | None
) -> None:
    await _rejected(oidc.verify(_bearer(_sign(key, iss=issuer))), 401)


async def test_account_not_on_the_list_is_403(oidc: OidcAuthenticator, key: SigningKey) -> None:
    error = await _rejected(oidc.verify(_bearer(_sign(key, email=OTHER))), 403)
    assert "not allowed" in error.message


@pytest.mark.parametrize("verified", [False, "true", None])
async def test_email_not_verified_is_401(
    oidc: OidcAuthenticator, key: SigningKey, verified: object
) -> None:
    await _rejected(oidc.verify(_bearer(_sign(key, email_verified=verified))), 401)


async def test_missing_email_is_401(make_oidc: MakeOidc, key: SigningKey) -> None:
    oidc = make_oidc(service_accounts=[])
    await _rejected(oidc.verify(_bearer(_sign(key, email=None))), 401)


async def test_tampered_payload_is_401(oidc: OidcAuthenticator, key: SigningKey) -> None:
    header, _, signature = _sign(key, email=OTHER).split(".")
    forged = _segment(_claims())
    await _rejected(oidc.verify(_bearer(f"{header}.{forged}.{signature}")), 401)


async def test_signature_by_another_key_is_401(
    oidc: OidcAuthenticator, other_key: SigningKey
) -> None:
    await _rejected(oidc.verify(_bearer(_sign(other_key))), 401)


async def test_alg_none_is_401_before_any_fetch(
    oidc: OidcAuthenticator, certs_server: CertsServer
) -> None:
    token = f"{_segment({'alg': 'none', 'kid': KID, 'typ': 'JWT'})}.{_segment(_claims())}."
    await _rejected(oidc.verify(_bearer(token)), 401)
    assert certs_server.fetches == 0


async def test_hs256_keyed_with_the_certificate_is_401(
    oidc: OidcAuthenticator, key: SigningKey, certs_server: CertsServer
) -> None:
    # The classic algorithm-confusion forgery: the public certificate used as an HMAC secret.
    # PyJWT refuses PEM material as an HMAC key, so the token is assembled by hand.
    signing_input = f"{_segment({'alg': 'HS256', 'kid': KID, 'typ': 'JWT'})}.{_segment(_claims())}"
    mac = hmac.new(key.certificate_pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    token = f"{signing_input}.{_b64(mac)}"
    await _rejected(oidc.verify(_bearer(token)), 401)
    assert certs_server.fetches == 0


async def test_es256_token_is_401_even_with_its_certificate_served(
    oidc: OidcAuthenticator, certs_server: CertsServer
) -> None:
    # google-auth alone would accept ES256 against an EC certificate; only RS256 is allowed.
    ec_key = _make_key("ec")
    certs_server.certs["ec-key"] = ec_key.certificate_pem
    token = _sign(ec_key, kid="ec-key", algorithm="ES256")
    await _rejected(oidc.verify(_bearer(token)), 401)


async def test_missing_key_id_is_401(oidc: OidcAuthenticator, key: SigningKey) -> None:
    await _rejected(oidc.verify(_bearer(_sign(key, kid=None))), 401)


# --- oidc: key ids, caching, and the certificates endpoint ---------------------------------


async def test_unknown_key_id_refetches_once_then_is_401(
    oidc: OidcAuthenticator, key: SigningKey, certs_server: CertsServer, clock: FakeClock
) -> None:
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    assert certs_server.fetches == 1
    clock.now += 61  # past the refetch rate limit, well inside max-age
    await _rejected(oidc.verify(_bearer(_sign(key, kid="made-up-1"))), 401)
    assert certs_server.fetches == 2
    # Rate-limited: another made-up key id straight after does not reach the endpoint.
    await _rejected(oidc.verify(_bearer(_sign(key, kid="made-up-2"))), 401)
    assert certs_server.fetches == 2


async def test_unknown_key_id_on_a_fresh_cache_does_not_refetch(
    oidc: OidcAuthenticator, key: SigningKey, certs_server: CertsServer
) -> None:
    await _rejected(oidc.verify(_bearer(_sign(key, kid="made-up"))), 401)
    assert certs_server.fetches == 1


async def test_rotated_key_is_picked_up_by_the_refetch(
    oidc: OidcAuthenticator,
    key: SigningKey,
    other_key: SigningKey,
    certs_server: CertsServer,
    clock: FakeClock,
) -> None:
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    certs_server.certs["key-2"] = other_key.certificate_pem
    clock.now += 61
    assert await oidc.verify(_bearer(_sign(other_key, kid="key-2"))) == PUSHER
    assert certs_server.fetches == 2


async def test_certificates_are_cached_until_max_age(
    oidc: OidcAuthenticator, key: SigningKey, certs_server: CertsServer, clock: FakeClock
) -> None:
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    clock.now += MAX_AGE - 1
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    assert certs_server.fetches == 1
    clock.now += 2
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    assert certs_server.fetches == 2


async def test_without_max_age_the_default_lifetime_applies(
    make_oidc: MakeOidc, key: SigningKey, certs_server: CertsServer, clock: FakeClock
) -> None:
    certs_server.max_age = None
    oidc = make_oidc(default_max_age=300.0)
    await oidc.verify(_bearer(_sign(key)))
    clock.now += 299
    await oidc.verify(_bearer(_sign(key)))
    assert certs_server.fetches == 1
    clock.now += 2
    await oidc.verify(_bearer(_sign(key)))
    assert certs_server.fetches == 2


async def test_concurrent_verifications_share_one_fetch(
    oidc: OidcAuthenticator, key: SigningKey, certs_server: CertsServer
) -> None:
    certs_server.delay = 0.1
    token = _bearer(_sign(key))
    results = await asyncio.gather(*(oidc.verify(token) for _ in range(20)))
    assert results == [PUSHER] * 20
    assert certs_server.fetches == 1


async def test_a_slow_fetch_does_not_block_the_event_loop(
    oidc: OidcAuthenticator, key: SigningKey, certs_server: CertsServer
) -> None:
    certs_server.delay = 0.3
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            await asyncio.sleep(0.01)
            ticks += 1

    async def verify() -> str | None:
        try:
            return await oidc.verify(_bearer(_sign(key)))
        finally:
            done.set()

    email, _ = await asyncio.gather(verify(), ticker())
    assert email == PUSHER
    assert ticks >= 10


async def test_a_cancelled_caller_does_not_cancel_the_shared_fetch(
    oidc: OidcAuthenticator, key: SigningKey, certs_server: CertsServer
) -> None:
    certs_server.delay = 0.2
    token = _bearer(_sign(key))
    first = asyncio.create_task(oidc.verify(token))
    second = asyncio.create_task(oidc.verify(token))
    await asyncio.sleep(0.05)
    first.cancel()
    assert await second == PUSHER
    assert certs_server.fetches == 1


async def test_certs_endpoint_down_is_503(make_oidc: MakeOidc, key: SigningKey) -> None:
    oidc = make_oidc(certs_url=f"http://127.0.0.1:{_unused_port()}/certs")
    error = await _rejected(oidc.verify(_bearer(_sign(key))), 503)
    assert error.message == "authentication temporarily unavailable"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, None),
        (404, None),
        (200, b"<html>not json</html>"),
        (200, b"[]"),
        (200, b"{}"),
        (200, json.dumps({KID: "not a certificate"}).encode()),
    ],
)
async def test_certs_endpoint_bad_answer_is_503(
    oidc: OidcAuthenticator,
    key: SigningKey,
    certs_server: CertsServer,
    status: int,
    body: bytes | None,
) -> None:
    certs_server.status = status
    certs_server.body = body
    await _rejected(oidc.verify(_bearer(_sign(key))), 503)


async def test_a_failed_fetch_is_retried_on_the_next_request(
    oidc: OidcAuthenticator, key: SigningKey, certs_server: CertsServer
) -> None:
    certs_server.status = 500
    token = _bearer(_sign(key))
    await _rejected(oidc.verify(token), 503)
    certs_server.status = 200
    assert await oidc.verify(token) == PUSHER
    assert certs_server.fetches == 2


def _fail(certs_server: CertsServer, failure: str) -> None:
    if failure == "down":
        certs_server.drop = True
    elif failure == "unparsable":
        certs_server.body = b"<html>maintenance</html>"
    else:
        certs_server.status = int(failure)


@pytest.mark.parametrize("failure", ["500", "down", "unparsable"])
async def test_expired_cache_within_the_grace_keeps_verifying_when_the_refresh_fails(
    oidc: OidcAuthenticator,
    key: SigningKey,
    certs_server: CertsServer,
    clock: FakeClock,
    failure: str,
) -> None:
    certs_server.max_age = 1
    token = _bearer(_sign(key))
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    _fail(certs_server, failure)
    clock.now += 2
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{level} {message}")
    try:
        # Concurrent requests share the one failed refresh, which warns once.
        results = await asyncio.gather(*(oidc.verify(_bearer(_sign(key))) for _ in range(5)))
    finally:
        logger.remove(sink)
    assert results == [PUSHER] * 5
    assert certs_server.fetches == 2
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1
    assert "certificate refresh failed" in warnings[0]
    for line in lines:
        assert token.split(".")[1] not in line


async def test_expired_cache_past_the_grace_with_the_endpoint_down_is_503(
    make_oidc: MakeOidc, key: SigningKey, certs_server: CertsServer, clock: FakeClock
) -> None:
    oidc = make_oidc(stale_grace=30.0)
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    certs_server.status = 503
    clock.now += MAX_AGE + 29
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    clock.now += 2
    await _rejected(oidc.verify(_bearer(_sign(key))), 503)
    assert certs_server.fetches == 3


async def test_a_failing_refresh_is_retried_at_most_once_a_minute(
    oidc: OidcAuthenticator, key: SigningKey, certs_server: CertsServer, clock: FakeClock
) -> None:
    certs_server.max_age = 1
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    certs_server.status = 500
    clock.now += 2
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    assert certs_server.fetches == 2
    for _ in range(3):
        clock.now += 10
        assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    assert certs_server.fetches == 2
    clock.now += 31  # 61 s after the failed fetch started
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    assert certs_server.fetches == 3
    certs_server.status = 200
    clock.now += 30
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    assert certs_server.fetches == 3
    clock.now += 31
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    assert certs_server.fetches == 4
    # Once a refresh succeeds again, a short max-age is honoured without the rate limit.
    clock.now += 2
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    assert certs_server.fetches == 5


async def test_unknown_key_id_with_stale_certificates_is_503_without_a_fetch(
    oidc: OidcAuthenticator, key: SigningKey, certs_server: CertsServer, clock: FakeClock
) -> None:
    certs_server.max_age = 1
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    certs_server.status = 500
    clock.now += 2
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    await _rejected(oidc.verify(_bearer(_sign(key, kid="rotated"))), 503)
    assert certs_server.fetches == 2


async def test_unusable_entries_are_dropped_but_good_ones_kept(
    oidc: OidcAuthenticator, key: SigningKey, certs_server: CertsServer
) -> None:
    certs_server.certs["broken"] = "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----"
    assert await oidc.verify(_bearer(_sign(key))) == PUSHER
    await _rejected(oidc.verify(_bearer(_sign(key, kid="broken"))), 401)


async def test_no_token_in_messages_or_logs(
    oidc: OidcAuthenticator, key: SigningKey, certs_server: CertsServer
) -> None:
    lines: list[str] = []
    sink = logger.add(lines.append, level="TRACE", format="{message}")
    secret_part = "c2VjcmV0LXRva2VuLXBhcnQ"
    try:
        malformed = f"{secret_part}.{secret_part}"
        tampered = _sign(key)[:-8] + "AAAAAAAA"
        errors = [
            await _rejected(oidc.verify(_bearer(malformed)), 401),
            await _rejected(oidc.verify(_bearer(f"{secret_part}.e30.{secret_part}")), 401),
            await _rejected(oidc.verify(_bearer(tampered)), 401),
        ]
    finally:
        logger.remove(sink)
    assert lines, "rejections are expected to be logged"
    for text in [*lines, *(error.message for error in errors), *(str(e) for e in errors)]:
        assert secret_part not in text
        assert tampered.split(".")[1] not in text


# --- cloud-run-iam and none ----------------------------------------------------------------


def _unsigned(**claims: Any) -> str:
    # What Cloud Run forwards after its invoker check.
    header = _segment({"alg": "RS256", "kid": KID})
    return f"{header}.{_segment(_claims(**claims))}.SIGNATURE_REMOVED_BY_GOOGLE"


async def test_cloud_run_iam_accepts_a_listed_account() -> None:
    authenticator = CloudRunIamAuthenticator([PUSHER])
    assert await authenticator.verify(_bearer(_unsigned())) == PUSHER


async def test_cloud_run_iam_rejects_another_account_with_403() -> None:
    authenticator = CloudRunIamAuthenticator([PUSHER])
    await _rejected(authenticator.verify(_bearer(_unsigned(email=OTHER))), 403)


@pytest.mark.parametrize(
    "header", [None, "", "Basic abc", "Bearer garbage", "Bearer a.b.c", "Bearer e30.bm90IGpzb24.x"]
)
async def test_cloud_run_iam_rejects_undecodable_tokens_with_401(header: str | None) -> None:
    authenticator = CloudRunIamAuthenticator([PUSHER])
    await _rejected(authenticator.verify(header), 401)


async def test_cloud_run_iam_rejects_a_token_without_email_with_401() -> None:
    authenticator = CloudRunIamAuthenticator([PUSHER])
    await _rejected(authenticator.verify(_bearer(_unsigned(email=None))), 401)


async def test_none_accepts_everything() -> None:
    authenticator = NoAuthenticator()
    assert await authenticator.verify(None) is None
    assert await authenticator.verify("Bearer garbage") is None


def _settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"push_auth": "oidc", "push_audience": AUDIENCE}, OidcAuthenticator),
        ({"push_auth": "cloud-run-iam"}, CloudRunIamAuthenticator),
        ({"push_auth": "none"}, NoAuthenticator),
    ],
)
async def test_build_authenticator_follows_push_auth(
    values: dict[str, Any], expected: type[object]
) -> None:
    authenticator = build_authenticator(_settings(**values))
    try:
        assert isinstance(authenticator, expected)
    finally:
        await authenticator.aclose()


async def test_build_authenticator_passes_the_oidc_settings(
    key: SigningKey, certs_server: CertsServer
) -> None:
    settings = _settings(
        push_auth="oidc",
        push_audience=AUDIENCE,
        push_service_accounts=PUSHER,
        push_oidc_certs_url=certs_server.url,
    )
    authenticator = build_authenticator(settings)
    try:
        assert await authenticator.verify(_bearer(_sign(key))) == PUSHER
        await _rejected(authenticator.verify(_bearer(_sign(key, email=OTHER))), 403)
        await _rejected(authenticator.verify(_bearer(_sign(key, aud="other"))), 401)
    finally:
        await authenticator.aclose()


# --- the push endpoint with authentication on ------------------------------------------------


async def test_push_endpoint_enforces_oidc(
    make_settings: Callable[..., Settings],
    certs_server: CertsServer,
    key: SigningKey,
    llm: FakeOpenAI,
) -> None:
    settings = make_settings(
        push_auth="oidc",
        push_audience=AUDIENCE,
        push_service_accounts=PUSHER,
        push_oidc_certs_url=certs_server.url,
    )
    async with running_app(settings) as (app, client):
        run = await services_of(app).store.create_run("A tool library for neighbours.", None)
        body = encode_wrapped({"run_id": run.id}, "auth-1", "projects/p/subscriptions/s")

        missing = await client.post("/pubsub/push", content=body)
        assert missing.status_code == 401
        assert missing.json()["code"] == "unauthorized"

        stranger = _bearer(_sign(key, email=OTHER))
        forbidden = await client.post(
            "/pubsub/push", content=body, headers={"authorization": stranger}
        )
        assert forbidden.status_code == 403
        assert llm.calls() == []
        assert await services_of(app).store.list_quarantined(10, 0) == []

        certs_server.status = 500
        certs_server.max_age = None
        valid = {"authorization": _bearer(_sign(key))}
        # The certificates are cached from the 403 above, so an outage does not matter yet.
        accepted = await client.post("/pubsub/push", content=body, headers=valid)
        assert accepted.status_code == 204
        assert len(llm.calls()) == 6


async def test_push_endpoint_answers_503_when_certs_are_unreachable(
    make_settings: Callable[..., Settings], key: SigningKey, llm: FakeOpenAI
) -> None:
    settings = make_settings(
        push_auth="oidc",
        push_audience=AUDIENCE,
        push_service_accounts=PUSHER,
        push_oidc_certs_url=f"http://127.0.0.1:{_unused_port()}/certs",
    )
    async with running_app(settings) as (_, client):
        body = encode_wrapped({"idea": "An idea."}, "auth-2", "projects/p/subscriptions/s")
        response = await client.post(
            "/pubsub/push", content=body, headers={"authorization": _bearer(_sign(key))}
        )
        assert response.status_code == 503
        assert response.json()["code"] == "auth_unavailable"
        assert llm.calls() == []


# --- the /v1 API with API_AUTH=oidc ------------------------------------------------------------


async def test_api_requires_an_allowed_caller(
    make_settings: Callable[..., Settings],
    certs_server: CertsServer,
    key: SigningKey,
    llm: FakeOpenAI,
) -> None:
    operator = "ops@example.com"
    settings = make_settings(
        api_auth="oidc",
        api_allowed_principals=operator,
        api_audiences=SERVICE_URL,
        push_oidc_certs_url=certs_server.url,
    )
    async with running_app(settings) as (_, client):
        anonymous = await client.get("/v1/runs")
        assert anonymous.status_code == 401
        assert anonymous.json()["code"] == "unauthorized"

        stranger = _bearer(_sign(key, email=OTHER, aud=SERVICE_URL))
        refused = await client.get("/v1/runs", headers={"authorization": stranger})
        assert refused.status_code == 403

        wrong_audience = _bearer(_sign(key, email=operator))
        assert (
            await client.get("/v1/runs", headers={"authorization": wrong_audience})
        ).status_code == 401

        allowed = {"authorization": _bearer(_sign(key, email=operator, aud=SERVICE_URL))}
        assert (await client.get("/v1/runs", headers=allowed)).status_code == 200
        submitted = await client.post("/v1/full-review", json={"idea": "An idea."}, headers=allowed)
        assert submitted.status_code == 202

        # Liveness, readiness and the push endpoint (PUSH_AUTH=none here) are not /v1's business.
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/ready")).status_code == 200
        body = encode_wrapped({"idea": "Another idea."}, "api-1", "projects/p/subscriptions/s")
        assert (await client.post("/pubsub/push", content=body)).status_code == 204


@pytest.mark.parametrize(
    "audience",
    [GCLOUD_AUDIENCE, "https://another-service-987.europe-west1.run.app", "another-custom-aud"],
)
async def test_api_refuses_a_token_minted_for_another_audience(
    make_settings: Callable[..., Settings],
    certs_server: CertsServer,
    key: SigningKey,
    llm: FakeOpenAI,
    audience: str,
) -> None:
    """A token an allowed person minted for anything else (gcloud's shared client id
    included) is not replayable here: only the service's own audience is accepted."""
    operator = "ops@example.com"
    settings = make_settings(
        api_auth="oidc",
        api_allowed_principals=operator,
        api_audiences=SERVICE_URL,
        push_oidc_certs_url=certs_server.url,
    )
    async with running_app(settings) as (_, client):
        elsewhere = {"authorization": _bearer(_sign(key, email=operator, aud=audience))}
        refused = await client.get("/v1/runs", headers=elsewhere)
        assert refused.status_code == 401
        assert refused.json()["code"] == "unauthorized"
        mine = {"authorization": _bearer(_sign(key, email=operator, aud=SERVICE_URL))}
        assert (await client.get("/v1/runs", headers=mine)).status_code == 200


async def test_api_accepts_gcloud_s_audience_only_when_opted_in(
    make_settings: Callable[..., Settings],
    certs_server: CertsServer,
    key: SigningKey,
    llm: FakeOpenAI,
) -> None:
    operator = "ops@example.com"
    settings = make_settings(
        api_auth="oidc",
        api_allowed_principals=operator,
        api_audiences=SERVICE_URL,
        api_allow_gcloud_audience=True,
        push_oidc_certs_url=certs_server.url,
    )
    async with running_app(settings) as (_, client):
        gcloud = {"authorization": _bearer(_sign(key, email=operator, aud=GCLOUD_AUDIENCE))}
        assert (await client.get("/v1/runs", headers=gcloud)).status_code == 200
        mine = {"authorization": _bearer(_sign(key, email=operator, aud=SERVICE_URL))}
        assert (await client.get("/v1/runs", headers=mine)).status_code == 200


@pytest.mark.parametrize("opted_in", [False, True])
async def test_the_gcloud_audience_opt_in_warns_when_the_api_authenticator_is_built(
    opted_in: bool,
) -> None:
    settings = _settings(
        api_auth="oidc",
        api_allowed_principals="ops@example.com",
        api_audiences=SERVICE_URL,
        api_allow_gcloud_audience=opted_in,
    )
    lines: list[str] = []
    sink = logger.add(lines.append, level="WARNING", format="{level} {message}")
    try:
        authenticator = build_api_authenticator(settings)  # what the app's start-up calls
        await authenticator.aclose()
    finally:
        logger.remove(sink)
    warned = [line for line in lines if "API_ALLOW_GCLOUD_AUDIENCE" in line]
    assert len(warned) == (1 if opted_in else 0)
    assert all(line.startswith("WARNING") for line in warned)


def test_api_oidc_without_principals_is_refused() -> None:
    with pytest.raises(ValueError, match="API_ALLOWED_PRINCIPALS"):
        Settings(_env_file=None, api_auth="oidc")


def test_production_guards_the_api_when_push_auth_is_oidc() -> None:
    production: dict[str, Any] = {
        "env": "production",
        "openai_api_key": "sk-x",
        "database_url": "postgresql://db/x",
        "pubsub_project_id": "p",
        "push_audience": AUDIENCE,
        "push_service_accounts": PUSHER,
    }
    with pytest.raises(ValueError, match="API_ALLOWED_PRINCIPALS"):
        Settings(_env_file=None, **production)
    with pytest.raises(ValueError, match="needs API_AUTH=oidc"):
        Settings(_env_file=None, api_auth="none", **production)
    guarded = Settings(
        _env_file=None,
        api_allowed_principals="ops@example.com",
        api_audiences=SERVICE_URL,
        **production,
    )
    assert guarded.effective_api_auth == "oidc"
    behind_iam = Settings(_env_file=None, **{**production, "push_auth": "cloud-run-iam"})
    assert behind_iam.effective_api_auth == "none"


@pytest.mark.parametrize(
    ("path", "accepted"), [("/pubsub/dead-letter", 204), ("/tasks/sweep", 200)]
)
async def test_dead_letters_and_the_sweep_are_guarded_like_pushes(
    make_settings: Callable[..., Settings], llm: FakeOpenAI, path: str, accepted: int
) -> None:
    settings = make_settings(push_auth="cloud-run-iam", push_service_accounts=PUSHER)
    body = encode_wrapped({"idea": "A seed library."}, "m-guard", "projects/p/subscriptions/s")
    async with running_app(settings) as (_, client):
        assert (await client.post(path, content=body)).status_code == 401
        other = {"authorization": _bearer(_unsigned(email=OTHER))}
        assert (await client.post(path, content=body, headers=other)).status_code == 403
        pusher = {"authorization": _bearer(_unsigned())}
        assert (await client.post(path, content=body, headers=pusher)).status_code == accepted


def _as_cloud_run_forwards(token: str) -> str:
    # Cloud Run's invoker check replaces the signature of the header it verified.
    header, payload, _ = token.split(".")
    return f"{header}.{payload}.SIGNATURE_REMOVED_BY_GOOGLE"


@pytest.mark.parametrize("stripped", [False, True], ids=["as-signed", "signature-removed"])
@pytest.mark.parametrize("path", ["/pubsub/push", "/pubsub/dead-letter", "/tasks/sweep"])
async def test_cloud_run_iam_reads_only_the_header_cloud_run_verified(
    make_settings: Callable[..., Settings],
    llm: FakeOpenAI,
    key: SigningKey,
    other_key: SigningKey,
    path: str,
    stripped: bool,
) -> None:
    """With X-Serverless-Authorization present Cloud Run verifies that header and passes
    Authorization through untouched, so only the former names the caller."""
    service_url = "https://consensus-engine.example.run.app"
    invoker = "api-caller@project.iam.gserviceaccount.com"
    settings = make_settings(push_auth="cloud-run-iam", push_service_accounts=PUSHER)

    def verified(token: str) -> str:
        return _bearer(_as_cloud_run_forwards(token) if stripped else token)

    # An invoker's valid token (what Cloud Run checked) and a push-account token it forged.
    invoker_token = _sign(key, email=invoker, aud=service_url)
    forged_pusher_token = _sign(other_key, email=PUSHER, aud=service_url)
    forged = {
        "x-serverless-authorization": verified(invoker_token),
        "authorization": _bearer(forged_pusher_token),
    }
    genuine = {
        "x-serverless-authorization": verified(_sign(key, aud=service_url)),
        "authorization": "Bearer junk",
    }
    body = encode_wrapped({"idea": "A seed library."}, "m-forged", "projects/p/subscriptions/s")
    async with running_app(settings) as (_, client):
        refused = await client.post(path, content=body, headers=forged)
        assert refused.status_code == 403
        assert refused.json()["code"] == "forbidden"
        assert llm.calls() == []
        accepted = await client.post(path, content=body, headers=genuine)
        assert accepted.status_code < 300


async def test_a_verified_token_is_remembered_until_it_expires(
    oidc: OidcAuthenticator, key: SigningKey, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A redelivery storm sends one token again and again: checked once, then looked up."""
    decoded: list[str] = []
    real_decode = google_jwt.decode

    def counting_decode(token: str, **kwargs: Any) -> Any:
        decoded.append(token)
        return real_decode(token, **kwargs)  # type: ignore[no-untyped-call]

    # app.auth calls google-auth through its module, so this is what it calls.
    monkeypatch.setattr(google_jwt, "decode", counting_decode)
    token = _bearer(_sign(key))
    for _ in range(5):
        assert await oidc.verify(token) == PUSHER
    assert len(decoded) == 1

    # Past its exp (and the skew) the remembered answer no longer stands: checked again.
    clock.now += 3600 + CLOCK_SKEW_SECONDS + 1
    assert await oidc.verify(token) == PUSHER
    assert len(decoded) == 2

    # A refused token is never remembered.
    other = _bearer(_sign(key, email=OTHER))
    for _ in range(2):
        await _rejected(oidc.verify(other), 403)
    assert len(decoded) == 4
