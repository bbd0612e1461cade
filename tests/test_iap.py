"""UI_AUTH=iap: the run viewer verifies Identity-Aware Proxy's signed header itself.

Real ES256 assertions signed as IAP signs them, verified against a local key endpoint that
answers in IAP's format ({key id: PEM public key}); a request that went around the proxy, or
carries anything else, is refused.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from app.auth import IAP_JWT_HEADER, AuthError, IapAuthenticator, build_ui_authenticator
from app.settings import Settings
from tests.conftest import running_app
from tests.test_auth import CertsServer, _make_key, serving

AUDIENCE = "/projects/123456789/locations/europe-west1/services/consensus-engine"
VIEWER = "reviewer@example.com"
KID = "iap-key-1"


def _public_pem(private: ec.EllipticCurvePrivateKey) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def iap_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def iap_keys(iap_key: ec.EllipticCurvePrivateKey) -> Iterator[CertsServer]:
    """A local stand-in for https://www.gstatic.com/iap/verify/public_key."""
    with serving(CertsServer(certs={KID: _public_pem(iap_key)}), "/iap/verify/public_key") as keys:
        yield keys


def _assertion(key: Any, algorithm: str = "ES256", kid: str = KID, **overrides: Any) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "https://cloud.google.com/iap",
        "aud": AUDIENCE,
        "sub": "accounts.google.com:1234567890",
        "email": VIEWER,
        "hd": "example.com",
        "iat": now,
        "exp": now + 600,
        "jti": uuid.uuid4().hex,
    }
    claims.update(overrides)
    claims = {name: value for name, value in claims.items() if value is not None}
    return pyjwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid})


def _settings(iap_keys: CertsServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "testing",
        "ui_enabled": True,
        "ui_auth": "iap",
        "ui_iap_audience": AUDIENCE,
        "ui_iap_certs_url": iap_keys.url,
        **overrides,
    }
    return Settings(_env_file=None, **values)


@pytest.fixture
async def iap(iap_keys: CertsServer) -> AsyncIterator[IapAuthenticator]:
    authenticator = build_ui_authenticator(_settings(iap_keys))
    assert isinstance(authenticator, IapAuthenticator)
    yield authenticator
    await authenticator.aclose()


async def _refused(iap: IapAuthenticator, headers: dict[str, str]) -> AuthError:
    with pytest.raises(AuthError) as caught:
        await iap.verify_request(headers)
    assert caught.value.status == 401
    return caught.value


async def test_an_assertion_iap_signed_gives_the_viewer(
    iap: IapAuthenticator, iap_key: ec.EllipticCurvePrivateKey, iap_keys: CertsServer
) -> None:
    assert await iap.verify_request({IAP_JWT_HEADER: _assertion(iap_key)}) == VIEWER
    assert await iap.verify_request({IAP_JWT_HEADER: _assertion(iap_key)}) == VIEWER
    assert iap_keys.fetches == 1  # IAP's keys are cached like Google's certificates


async def test_a_request_that_went_around_the_proxy_is_refused(
    iap: IapAuthenticator, iap_key: ec.EllipticCurvePrivateKey
) -> None:
    # No IAP header; a bearer token of the right shape elsewhere changes nothing.
    error = await _refused(iap, {"authorization": f"Bearer {_assertion(iap_key)}"})
    assert error.message == "missing IAP assertion"
    await _refused(iap, {IAP_JWT_HEADER: ""})


@pytest.mark.parametrize(
    "claims",
    [
        {"aud": "/projects/123456789/global/backendServices/999"},  # another IAP resource
        {"iss": "https://accounts.google.com"},  # a Google ID token is not IAP's assertion
        {"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200},
        {"email": None},
    ],
)
async def test_assertions_for_something_else_are_refused(
    iap: IapAuthenticator, iap_key: ec.EllipticCurvePrivateKey, claims: dict[str, Any]
) -> None:
    await _refused(iap, {IAP_JWT_HEADER: _assertion(iap_key, **claims)})


async def test_a_forged_or_rs256_assertion_is_refused(iap: IapAuthenticator) -> None:
    forger = ec.generate_private_key(ec.SECP256R1())
    await _refused(iap, {IAP_JWT_HEADER: _assertion(forger)})
    rsa_key = _make_key().private
    await _refused(iap, {IAP_JWT_HEADER: _assertion(rsa_key, algorithm="RS256")})
    await _refused(iap, {IAP_JWT_HEADER: "not.a.jwt"})
    await _refused(iap, {IAP_JWT_HEADER: "x" * 10_000})


def test_settings_for_the_viewer() -> None:
    assert Settings(_env_file=None).effective_ui_enabled  # development: on
    assert not Settings(_env_file=None, env="testing").effective_ui_enabled
    with pytest.raises(ValidationError, match="UI_IAP_AUDIENCE"):
        Settings(_env_file=None, ui_enabled=True, ui_auth="iap")
    production: dict[str, Any] = {
        "env": "production",
        "openai_api_key": "sk-x",
        "push_audience": "https://svc.example/pubsub/push",
        "push_service_accounts": "push@p.iam.gserviceaccount.com",
        "database_url": "postgresql://u@127.0.0.1/db",
        "pubsub_project_id": "p",
        "api_audiences": "https://svc.example",
        "api_allowed_principals": "caller@p.iam.gserviceaccount.com",
    }
    assert not Settings(_env_file=None, **production).effective_ui_enabled  # off unless enabled
    with pytest.raises(ValidationError, match="UI_IAP_AUDIENCE"):
        Settings(_env_file=None, **production, ui_enabled=True)  # iap by default
    with pytest.raises(ValidationError, match="refuses UI_AUTH=none"):
        Settings(_env_file=None, **production, ui_enabled=True, ui_auth="none")
    enabled = Settings(_env_file=None, **production, ui_enabled=True, ui_iap_audience=AUDIENCE)
    assert enabled.effective_ui_auth == "iap"


async def test_every_page_and_the_viewers_stream_ask_for_iap(
    make_settings: Callable[..., Settings],
    iap_keys: CertsServer,
    iap_key: ec.EllipticCurvePrivateKey,
) -> None:
    settings = make_settings(
        ui_enabled=True, ui_auth="iap", ui_iap_audience=AUDIENCE, ui_iap_certs_url=iap_keys.url
    )
    async with running_app(settings) as (_app, client):
        signed = {IAP_JWT_HEADER: _assertion(iap_key)}
        forged = {IAP_JWT_HEADER: _assertion(ec.generate_private_key(ec.SECP256R1()))}
        for path in ("/", "/runs", "/compare", f"/runs/{uuid.uuid4()}/events"):
            assert (await client.get(path)).status_code == 401, path
            assert (await client.get(path, headers=forged)).status_code == 401, path
        assert (await client.get("/", headers=signed)).status_code == 200
        assert (await client.get("/runs", headers=signed)).status_code == 200
        answer = await client.post(
            "/",
            content=b"idea=An+idea.",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert answer.status_code == 401
        # /v1 keeps its own guard (API_AUTH), whatever the pages ask.
        assert (await client.get("/v1/runs")).status_code == 200
