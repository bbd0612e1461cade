"""Authentication with Google-signed OIDC tokens: push deliveries (SPEC §3.3) and the /v1 API.

`build_authenticator` picks the push mode from `PUSH_AUTH`:

- `oidc`: the app verifies Google's signed OIDC token itself, with certificates cached in memory;
- `cloud-run-iam`: Cloud Run verified the token already, the app only pins the service account,
  read from the header Cloud Run verified (`X-Serverless-Authorization` when present);
- `none`: development only, everything is accepted.

`build_api_authenticator` does the same for `/v1` from `API_AUTH` (`oidc` or `none`): with
`PUSH_AUTH=oidc` Cloud Run's invoker check is off, so the app must guard its API itself.

`build_ui_authenticator` guards the run viewer from `UI_AUTH`: `iap` verifies the JWT
Identity-Aware Proxy signs into `x-goog-iap-jwt-assertion` (ES256, IAP's own keys and issuer),
so a request that reached the service around the proxy is refused; `api` asks what `/v1` asks.

No token, header value or raw google-auth error text ever reaches a log line or an error
message: several google-auth messages quote the token they failed to parse.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import requests
from google.auth import crypt, jwt
from google.auth import exceptions as google_exceptions
from google.auth.transport.requests import Request
from loguru import logger

from app.bounded import BoundedDict
from app.settings import Settings

GOOGLE_ISSUERS = frozenset({"accounts.google.com", "https://accounts.google.com"})
IAP_ISSUERS = frozenset({"https://cloud.google.com/iap"})
IAP_JWT_HEADER = "x-goog-iap-jwt-assertion"
CLOCK_SKEW_SECONDS = 10
DEFAULT_CERTS_MAX_AGE_SECONDS = 300.0
# A hostile or broken Cache-Control must not pin a set of keys for longer than this.
MAX_CERTS_MAX_AGE_SECONDS = 24 * 3600.0
# An unknown key id may mean Google rotated its keys; refetching at most this often keeps a
# stream of made-up key ids from turning every request into a certificate fetch.
MIN_REFETCH_INTERVAL_SECONDS = 60.0
# How long after expiry a cached set may still verify tokens while refreshing it fails: an
# outage of Google's certs endpoint (or of our route to it) must not turn every delivery into a
# 503. Google lists a new signing key well before signing with it and keeps a retired one listed
# for a while, so a set a few hours old still verifies current tokens; much older and a key
# Google has withdrawn would be trusted too long, so past the grace it is 503 again.
CERTS_STALE_GRACE_SECONDS = 6 * 3600.0
CERTS_FETCH_TIMEOUT_SECONDS = 10.0
# Pub/Sub sends the same token with every push until it expires (about an hour): remembering
# the tokens already verified turns a redelivery storm's checks into dict lookups instead of a
# signature check in a worker thread each. Bounded; the oldest entry goes first.
VERIFIED_TOKENS_MAX = 1024
# Google's ID tokens are about 1 KB; anything far larger is not worth decoding.
MAX_TOKEN_CHARS = 8192

AUTHORIZATION = "authorization"
# Cloud Run verifies this header instead of Authorization when both are present.
SERVERLESS_AUTHORIZATION = "x-serverless-authorization"

_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)

AuthCode = Literal["unauthorized", "forbidden", "auth_unavailable"]
_CODES: dict[int, AuthCode] = {401: "unauthorized", 403: "forbidden", 503: "auth_unavailable"}


class AuthError(Exception):
    """A request failed authentication; `status` and `message` are safe to send back."""

    def __init__(self, status: Literal[401, 403, 503], message: str) -> None:
        super().__init__(message)
        self.status: int = status
        self.code: AuthCode = _CODES[status]
        self.message = message


def _unauthorized(message: str = "invalid bearer token") -> AuthError:
    return AuthError(401, message)


@dataclass(frozen=True)
class TokenKind:
    """How one kind of Google-signed JWT is checked."""

    algorithm: Literal["RS256", "ES256"]
    issuers: frozenset[str]
    # Google's ID tokens say whether the email is verified; IAP's assertions carry no such claim.
    requires_email_verified: bool


GOOGLE_ID_TOKEN = TokenKind("RS256", GOOGLE_ISSUERS, requires_email_verified=True)
IAP_ASSERTION = TokenKind("ES256", IAP_ISSUERS, requires_email_verified=False)


class Authenticator(Protocol):
    """Checks the credentials of one request."""

    async def verify_request(self, headers: Mapping[str, str]) -> str | None:
        """Verify the header this mode trusts; callers pass all headers, never pick one."""
        ...

    async def verify(self, authorization: str | None) -> str | None:
        """Return the verified caller email (None when auth is off) or raise AuthError."""
        ...

    async def aclose(self) -> None:
        """Release whatever the authenticator holds (HTTP session, in-flight fetch)."""
        ...


def build_authenticator(settings: Settings) -> Authenticator:
    """The authenticator for `settings.effective_push_auth`."""
    mode = settings.effective_push_auth
    if mode == "oidc":
        if not settings.push_audience:
            raise ValueError("PUSH_AUTH=oidc needs PUSH_AUDIENCE")
        return OidcAuthenticator(
            audience=settings.push_audience,
            service_accounts=settings.push_service_accounts,
            certs_url=settings.push_oidc_certs_url,
        )
    if mode == "cloud-run-iam":
        return CloudRunIamAuthenticator(service_accounts=settings.push_service_accounts)
    return NoAuthenticator()


def build_api_authenticator(settings: Settings) -> Authenticator:
    """The authenticator for the `/v1` API (`settings.effective_api_auth`)."""
    if settings.effective_api_auth == "oidc":
        if settings.api_allow_gcloud_audience:
            logger.warning(
                "API_ALLOW_GCLOUD_AUDIENCE=true: /v1 accepts ID tokens minted for gcloud's shared "
                "client id, so a token an allowed caller minted for any other purpose works here "
                "too; prefer API_AUDIENCES with this service's URL or a custom audience"
            )
        return OidcAuthenticator(
            audience=settings.effective_api_audiences,
            service_accounts=settings.api_allowed_principals,
            certs_url=settings.push_oidc_certs_url,
        )
    return NoAuthenticator()


def build_ui_authenticator(settings: Settings) -> Authenticator:
    """The authenticator for the run viewer's pages (`settings.effective_ui_auth`)."""
    mode = settings.effective_ui_auth
    if mode == "iap":
        if not settings.ui_iap_audience:
            raise ValueError("UI_AUTH=iap needs UI_IAP_AUDIENCE")
        return IapAuthenticator(
            audience=settings.ui_iap_audience,
            # IAP's access policy decides who gets through; the app checks the proxy said so.
            service_accounts=(),
            certs_url=settings.ui_iap_certs_url,
            kind=IAP_ASSERTION,
        )
    if mode == "api":
        return build_api_authenticator(settings)
    return NoAuthenticator()


class NoAuthenticator:
    """`none`: accepts every request (settings refuse it where it would leave a hole)."""

    async def verify_request(self, headers: Mapping[str, str]) -> str | None:
        """Accept without looking at the headers."""
        return None

    async def verify(self, authorization: str | None) -> str | None:
        """Accept without looking at the header."""
        return None

    async def aclose(self) -> None:
        """Nothing to release."""


class CloudRunIamAuthenticator:
    """`PUSH_AUTH=cloud-run-iam`: pins the caller's email from the already-verified token.

    When a request carries `X-Serverless-Authorization`, Cloud Run's invoker check verifies
    that header and passes `Authorization` through untouched, unverified; so the identity is
    read from `X-Serverless-Authorization` when present, else from `Authorization`, never
    from the other one (anyone with run.invoker could otherwise pair their own valid token
    with a forged push-account token).
    """

    def __init__(self, service_accounts: Iterable[str]) -> None:
        self._allowed = _normalise_accounts(service_accounts)

    async def verify_request(self, headers: Mapping[str, str]) -> str | None:
        """Pin the email of the token in the header Cloud Run verified."""
        return await self.verify(cloud_run_verified_authorization(headers))

    async def verify(self, authorization: str | None) -> str | None:
        """Return the token's email if it is on the allow-list (empty list: any email)."""
        token = _bearer_token(authorization)
        try:
            # Cloud Run's invoker check verified the token and replaced its signature, so
            # there is nothing left to verify here; only the claims are read.
            claims = jwt.decode(token, verify=False)  # type: ignore[no-untyped-call]
        except (google_exceptions.GoogleAuthError, ValueError, TypeError):
            logger.warning("auth rejected: undecodable token")
            raise _unauthorized() from None
        return _pin_email(claims, self._allowed)

    async def aclose(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True)
class _Verified:
    email: str
    expires_at: float  # the token's `exp` plus the skew, on the authenticator's clock


@dataclass(frozen=True)
class _CertCache:
    certs: Mapping[str, str]
    expires_at: float  # on the authenticator's monotonic clock


class OidcAuthenticator:
    """`PUSH_AUTH=oidc`: verifies Google-signed OIDC tokens against cached certificates.

    Certificates come from `certs_url` (`{key id: PEM certificate}`) and are kept until the
    response's `Cache-Control: max-age` runs out. When refreshing them fails, the expired set
    keeps verifying for up to `stale_grace` seconds, refetched at most every
    `min_refetch_interval`. Callers that need certificates while a fetch is running await that
    same fetch instead of starting their own, and all blocking work (HTTP fetch, signature
    check) runs in a worker thread. A token that verified is remembered until its `exp`.
    """

    def __init__(
        self,
        *,
        audience: str | Sequence[str],
        service_accounts: Iterable[str],
        certs_url: str,
        clock: Callable[[], float] = time.monotonic,
        fetch_timeout: float = CERTS_FETCH_TIMEOUT_SECONDS,
        min_refetch_interval: float = MIN_REFETCH_INTERVAL_SECONDS,
        default_max_age: float = DEFAULT_CERTS_MAX_AGE_SECONDS,
        stale_grace: float = CERTS_STALE_GRACE_SECONDS,
        kind: TokenKind = GOOGLE_ID_TOKEN,
    ) -> None:
        # google-auth accepts a token whose `aud` is any of a list.
        self._audience = audience if isinstance(audience, str) else list(audience)
        self._allowed = _normalise_accounts(service_accounts)
        self._certs_url = certs_url
        self._clock = clock
        self._fetch_timeout = fetch_timeout
        self._min_refetch_interval = min_refetch_interval
        self._default_max_age = default_max_age
        self._stale_grace = stale_grace
        self._kind = kind
        self._session = requests.Session()
        self._request = Request(session=self._session)
        self._cache: _CertCache | None = None
        self._last_fetch_started: float | None = None
        self._last_fetch_failed = False
        self._inflight: asyncio.Task[_CertCache] | None = None
        self._verified: BoundedDict[str, _Verified] = BoundedDict(VERIFIED_TOKENS_MAX)

    async def verify_request(self, headers: Mapping[str, str]) -> str | None:
        """Verify `Authorization` (Cloud Run's invoker check is off in this mode)."""
        return await self.verify(headers.get(AUTHORIZATION))

    async def verify(self, authorization: str | None) -> str | None:
        """Return the verified caller's email or raise AuthError."""
        return await self._verify_token(_bearer_token(authorization))

    async def _verify_token(self, token: str) -> str:
        known = self._verified.get(token)
        if known is not None:
            if self._clock() < known.expires_at:
                return known.email
            del self._verified[token]
        key_id = _signing_key_id(token, self._kind.algorithm)
        pem = await self._certificate(key_id)
        try:
            claims = await asyncio.to_thread(
                jwt.decode,
                token,
                certs={key_id: pem},
                audience=self._audience,
                clock_skew_in_seconds=CLOCK_SKEW_SECONDS,
            )
        except google_exceptions.InvalidValue as error:
            # InvalidValue covers time and audience checks, whose text holds no token part.
            logger.warning("auth rejected: {}", str(error)[:200])
            raise _unauthorized() from None
        except (google_exceptions.GoogleAuthError, ValueError, TypeError):
            logger.warning("auth rejected: malformed token or bad signature")
            raise _unauthorized() from None
        _check_google_claims(claims, self._kind)
        email = _pin_email(claims, self._allowed)
        expires_at = claims.get("exp")
        if isinstance(expires_at, int | float):
            lifetime = expires_at + CLOCK_SKEW_SECONDS - time.time()
            self._verified[token] = _Verified(email, self._clock() + lifetime)
        return email

    async def aclose(self) -> None:
        """Abandon any in-flight certificate fetch and close the HTTP session."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None and not inflight.done():
            inflight.cancel()
            with contextlib.suppress(asyncio.CancelledError, AuthError):
                await inflight
        self._session.close()

    async def _certificate(self, key_id: str) -> str:
        cache, stale = await self._current_certs()
        pem = cache.certs.get(key_id)
        if pem is not None:
            return pem
        if stale:
            # The key may be a newly rotated one that the failing endpoint cannot deliver, so
            # this is the outage's 503 (as without the grace), not the caller's 401.
            logger.warning("auth: unknown signing key id while certificates cannot be refreshed")
            raise _unavailable()
        # Joining a fetch already under way costs nothing; starting one is rate-limited.
        fetching = self._inflight is not None and not self._inflight.done()
        last = self._last_fetch_started
        if fetching or last is None or self._clock() - last >= self._min_refetch_interval:
            cache = await self._refresh()
            pem = cache.certs.get(key_id)
            if pem is not None:
                return pem
        logger.warning("auth rejected: unknown signing key id")
        raise _unauthorized()

    async def _current_certs(self) -> tuple[_CertCache, bool]:
        """The certificates to verify with, and whether they are a stale set kept by the grace."""
        now = self._clock()
        cache = self._cache
        if cache is not None and now < cache.expires_at:
            return cache, False
        stale = self._stale_certs(now)
        fetching = self._inflight is not None and not self._inflight.done()
        last = self._last_fetch_started
        # After a failed refresh, the same rate limit as for unknown key ids: requests in between
        # use the stale set instead of each paying for a fetch that is likely to fail again.
        if (
            stale is not None
            and not fetching
            and self._last_fetch_failed
            and last is not None
            and now - last < self._min_refetch_interval
        ):
            return stale, True
        try:
            return await self._refresh(), False
        except AuthError:
            stale = self._stale_certs(self._clock())
            if stale is None:
                raise
            return stale, True

    def _stale_certs(self, now: float) -> _CertCache | None:
        """The cached set if it has expired, but less than the grace ago; else None."""
        cache = self._cache
        if cache is None or not cache.expires_at <= now < cache.expires_at + self._stale_grace:
            return None
        return cache

    async def _refresh(self) -> _CertCache:
        if self._inflight is None or self._inflight.done():
            started = self._clock()
            self._last_fetch_started = started
            self._inflight = asyncio.create_task(self._fetch_and_store(started))
        # Shielded so one caller giving up (client disconnect, timeout) does not cancel the
        # fetch the other callers are waiting on.
        return await asyncio.shield(self._inflight)

    async def _fetch_and_store(self, started: float) -> _CertCache:
        try:
            certs, max_age = await asyncio.to_thread(self._fetch_certs)
        except AuthError:
            self._last_fetch_failed = True
            # Logged here, in the one task every waiter shares, so once per failed refresh.
            now = self._clock()
            stale = self._stale_certs(now)
            if stale is not None:
                logger.warning(
                    "auth: certificate refresh failed; verifying with the set that expired"
                    " {:.0f} s ago (grace {:.0f} s)",
                    now - stale.expires_at,
                    self._stale_grace,
                )
            raise
        self._last_fetch_failed = False
        cache = _CertCache(certs=certs, expires_at=started + max_age)
        self._cache = cache
        logger.info("auth: fetched {} signing certificates for {:.0f} s", len(certs), max_age)
        return cache

    def _fetch_certs(self) -> tuple[dict[str, str], float]:
        """Blocking: GET the certificates and read how long they may be cached."""
        try:
            response = self._request(self._certs_url, method="GET", timeout=self._fetch_timeout)
        except (google_exceptions.GoogleAuthError, requests.RequestException, OSError) as error:
            logger.error("auth: certificates endpoint unreachable ({})", type(error).__name__)
            raise _unavailable() from None
        if response.status != 200:
            logger.error("auth: certificates endpoint answered {}", response.status)
            raise _unavailable()
        certs = _parse_certs(response.data, self._kind)
        if certs is None:
            logger.error("auth: certificates endpoint answered an unusable document")
            raise _unavailable()
        return certs, _max_age(response.headers, self._default_max_age)


class IapAuthenticator(OidcAuthenticator):
    """`UI_AUTH=iap`: the assertion Identity-Aware Proxy adds to every request it let through,
    verified like an ID token, against IAP's keys (`UI_IAP_CERTS_URL`) and audience."""

    async def verify_request(self, headers: Mapping[str, str]) -> str | None:
        token = headers.get(IAP_JWT_HEADER)
        if not token:
            logger.warning("auth rejected: no IAP assertion (request did not come through IAP)")
            raise _unauthorized("missing IAP assertion")
        if len(token) > MAX_TOKEN_CHARS:
            logger.warning("auth rejected: token too long")
            raise _unauthorized("invalid IAP assertion")
        return await self._verify_token(token.strip())


def _unavailable() -> AuthError:
    return AuthError(503, "authentication temporarily unavailable")


def _parse_certs(body: bytes, kind: TokenKind) -> dict[str, str] | None:
    """`{key id: PEM certificate or public key}` keeping only keys loadable for `kind`'s
    algorithm; None if none are."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    certs: dict[str, str] = {}
    for key_id, pem in document.items():
        try:
            if not isinstance(pem, str):
                raise TypeError("certificate is not a string")
            # Loaded once here so that a broken entry is dropped up front instead of failing
            # every verification that names it.
            verifier = crypt.RSAVerifier if kind.algorithm == "RS256" else crypt.ES256Verifier
            verifier.from_string(pem)
        except (ValueError, TypeError):
            logger.warning("auth: ignoring unusable certificate for key id {!r}", key_id[:64])
            continue
        certs[key_id] = pem
    return certs or None


def _max_age(headers: Mapping[str, str], default: float) -> float:
    """Seconds the response may be cached: `max-age` minus `Age`, else `default`."""
    match = _MAX_AGE.search(headers.get("Cache-Control", ""))
    if match is None:
        return default
    max_age = float(match.group(1))
    age = headers.get("Age", "")
    if age.strip().isdigit():
        max_age -= float(age)
    return min(max(max_age, 0.0), MAX_CERTS_MAX_AGE_SECONDS)


def cloud_run_verified_authorization(headers: Mapping[str, str]) -> str | None:
    """The header value Cloud Run's invoker check verified: `X-Serverless-Authorization` when
    the request has one (then `Authorization` is the caller's own, unverified), else
    `Authorization`. `headers` must look names up case-insensitively (Starlette's do)."""
    serverless = headers.get(SERVERLESS_AUTHORIZATION)
    if serverless is not None:
        return serverless
    return headers.get(AUTHORIZATION)


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        logger.warning("auth rejected: no Authorization header")
        raise _unauthorized("missing bearer token")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        logger.warning("auth rejected: Authorization header is not a bearer token")
        raise _unauthorized("missing bearer token")
    if len(token) > MAX_TOKEN_CHARS:
        logger.warning("auth rejected: token too long")
        raise _unauthorized()
    return token


def _signing_key_id(token: str, algorithm: str) -> str:
    """The token's key id, after insisting on `algorithm` (google-auth would take either)."""
    try:
        header = jwt.decode_header(token)  # type: ignore[no-untyped-call]
    except (google_exceptions.GoogleAuthError, ValueError, TypeError):
        logger.warning("auth rejected: undecodable token header")
        raise _unauthorized() from None
    if header.get("alg") != algorithm:
        logger.warning("auth rejected: signing algorithm is not {}", algorithm)
        raise _unauthorized()
    key_id = header.get("kid")
    if not isinstance(key_id, str) or not key_id:
        logger.warning("auth rejected: token has no key id")
        raise _unauthorized()
    return key_id


def _check_google_claims(claims: Mapping[str, Any], kind: TokenKind) -> None:
    if claims.get("iss") not in kind.issuers:
        logger.warning("auth rejected: issuer is not {}", "/".join(sorted(kind.issuers)))
        raise _unauthorized()
    # google-auth checks `iat` only; honour `nbf` too should a token carry one.
    not_before = claims.get("nbf")
    if not_before is not None and (
        not isinstance(not_before, int | float) or time.time() + CLOCK_SKEW_SECONDS < not_before
    ):
        logger.warning("auth rejected: token not valid yet")
        raise _unauthorized()
    if kind.requires_email_verified and claims.get("email_verified") is not True:
        logger.warning("auth rejected: email not verified")
        raise _unauthorized()


def _pin_email(claims: Mapping[str, Any], allowed: frozenset[str]) -> str:
    email = claims.get("email")
    if not isinstance(email, str) or not email:
        logger.warning("auth rejected: token has no email claim")
        raise _unauthorized()
    if allowed and email.lower() not in allowed:
        logger.warning("auth rejected: {} not allowed", email[:254])
        raise AuthError(403, "caller not allowed")
    return email


def _normalise_accounts(accounts: Iterable[str]) -> frozenset[str]:
    return frozenset(account.strip().lower() for account in accounts if account.strip())
