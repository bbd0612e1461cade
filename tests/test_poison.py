"""Poison inputs: nothing a request contains makes `/pubsub/push` or `/v1` answer 5xx.

What cannot be a job is acknowledged (204) and kept whole in `quarantined_messages`; what can
is a run. `/v1` answers a 4xx in the error shape.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from app.domain.ideas import MAX_JSON_DEPTH, json_problem, text_problem
from app.push.envelope import (
    MAX_MESSAGE_ID_CHARS,
    MAX_SUBSCRIPTION_CHARS,
    Job,
    MalformedPush,
    decode_push,
    parse_job,
    quarantine_headers,
)
from app.store.tables import Run
from tests.conftest import services_of

AppClient = tuple[FastAPI, httpx2.AsyncClient]

SUBSCRIPTION = "projects/p/subscriptions/s"
DEEP = "[" * 10_000 + "]" * 10_000  # far past Python's recursion limit
JUST_TOO_DEEP = "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)  # within it
NO_ID = object()  # as `message_id`: an envelope without messageId


def envelope(
    data: bytes | str,
    message_id: Any = "m-1",
    subscription: Any = SUBSCRIPTION,
    delivery_attempt: Any = None,
) -> bytes:
    """A wrapped push envelope; json.dumps writes NaN as NaN and lone surrogates as escapes."""
    raw = data.encode() if isinstance(data, str) else data
    message: dict[str, Any] = {
        "data": base64.b64encode(raw).decode(),
        "attributes": {},
        "publishTime": "2024-01-01T00:00:00Z",
    }
    if message_id is not NO_ID:
        message["messageId"] = message_id
    body: dict[str, Any] = {"message": message, "subscription": subscription}
    if delivery_attempt is not None:
        body["deliveryAttempt"] = delivery_attempt
    return json.dumps(body).encode()


def job(idea: Any = "A tool library for neighbours.", **fields: Any) -> str:
    return json.dumps({"idea": idea, **fields})


def storable(value: str | None, max_chars: int) -> bool:
    return value is None or (len(value) <= max_chars and text_problem(value) is None)


async def newest_quarantine_id(app: FastAPI) -> int:
    rows = await services_of(app).store.list_quarantined(1, 0)
    return rows[0].id if rows else 0


async def run_id_for(app: FastAPI, source_key: str) -> str | None:
    async with services_of(app).engine.connect() as connection:
        run_id: str | None = await connection.scalar(
            select(Run.id).where(Run.source_key == source_key)
        )
        return run_id


async def assert_acknowledged(
    app: FastAPI, client: httpx2.AsyncClient, body: bytes, headers: Mapping[str, str] | None = None
) -> str:
    """Push `body`: 204, and either a new quarantine row holding `body` or the message's run.

    Returns "quarantined" or "run".
    """
    before = await newest_quarantine_id(app)
    response = await client.post("/pubsub/push", content=body, headers=dict(headers or {}))
    assert response.status_code == 204, response.text
    rows = await services_of(app).store.list_quarantined(1, 0)
    if rows and rows[0].id > before:
        row = rows[0]
        assert row.raw_body == body
        assert storable(row.message_id, MAX_MESSAGE_ID_CHARS)
        assert storable(row.subscription, MAX_SUBSCRIPTION_CHARS)
        return "quarantined"
    # Not quarantined: then it was a job, and a self-contained one has its run.
    message = decode_push(body, headers or {})
    parsed = parse_job(message)
    if parsed.idea is not None:
        assert message.source_key is not None
        assert await run_id_for(app, message.source_key) is not None
    return "run"


async def assert_quarantined(
    app: FastAPI, client: httpx2.AsyncClient, body: bytes, headers: Mapping[str, str] | None = None
) -> None:
    assert await assert_acknowledged(app, client, body, headers) == "quarantined"


# --- explicit regressions: each of these answered 500 ---------------------------------------

POISON_PUSHES = {
    "NUL in idea": envelope(job("a\u0000b"), "nul-idea"),
    "NUL in messageId": envelope(job(), "m\u0000"),
    "NUL in extra_context": envelope(job(extra_context={"k": "v\u0000"}), "nul-extra"),
    "NUL in an extra_context key": envelope(job(extra_context={"k\u0000": 1}), "nul-key"),
    "NaN in extra_context": envelope(job(extra_context={"k": float("nan")}), "nan"),
    "Infinity in extra_context": envelope(job(extra_context=[float("inf")]), "inf"),
    "1e999 in extra_context": envelope(
        '{"idea": "An idea.", "extra_context": {"k": 1e999}}', "1e999"
    ),
    "lone surrogate in idea": envelope(job("\ud800"), "surrogate-idea"),
    "lone surrogate in extra_context": envelope(job(extra_context="x\udfff"), "surrogate-extra"),
    "lone surrogate in messageId": envelope(job(), "m\ud800"),
    "lone surrogate in subscription": envelope(job(), "surrogate-sub", "s\ud800"),
    "body nested 10 000 deep": DEEP.encode(),
    "envelope nested 10 000 deep": (
        '{"message": {"messageId": "deep-env", "data": "", "x": ' + DEEP + "}}"
    ).encode(),
    "data nested 10 000 deep": envelope(
        '{"idea": "An idea.", "extra_context": {"k": ' + DEEP + "}}", "deep-data"
    ),
    "extra_context one level too deep": envelope(
        '{"idea": "An idea.", "extra_context": {"k": ' + JUST_TOO_DEEP + "}}", "too-deep"
    ),
    "messageId over 256 characters": envelope(job(), "m" * 257),
    "subscription over 512 characters": envelope(job(), "long-sub", "s" * 513),
    "subscription and messageId over 512 together": envelope(job(), "m" * 256, "s" * 300),
    "non-UTF-8 data": envelope(b'{"idea": "\xff\xfe"}', "latin"),
    "run_id that is not a string": envelope(json.dumps({"run_id": {"a": 1}}), "odd-run-id"),
    "messageId that is not a string": envelope(job(), 12),
    "self-contained job without messageId": envelope(job(), NO_ID),
    "self-contained job with priority 'urgent'": envelope(job(priority="urgent"), "urgent"),
}


@pytest.mark.parametrize("body", POISON_PUSHES.values(), ids=POISON_PUSHES.keys())
async def test_poison_push_is_quarantined(app_client: AppClient, body: bytes) -> None:
    app, client = app_client
    await assert_quarantined(app, client, body)


@pytest.mark.parametrize("attempt", [2**31, 2**63, True, 0, -1, 1.5, "3"])
async def test_odd_delivery_attempt_is_ignored_and_the_job_runs(
    app_client: AppClient, attempt: Any
) -> None:
    app, client = app_client
    body = envelope(job(), f"attempt-{attempt!r}", delivery_attempt=attempt)
    assert await assert_acknowledged(app, client, body) == "run"
    assert decode_push(body, {}).delivery_attempt is None


async def test_unwrapped_push_with_unstorable_metadata_is_quarantined(
    app_client: AppClient,
) -> None:
    app, client = app_client
    await assert_quarantined(app, client, job().encode(), {"x-goog-pubsub-message-id": "m" * 257})
    await assert_quarantined(
        app,
        client,
        job().encode(),
        {"x-goog-pubsub-message-id": "m-ok", "x-goog-pubsub-subscription-name": "s" * 513},
    )


async def test_push_with_unstorable_headers_is_quarantined_without_credentials(
    app_client: AppClient,
) -> None:
    app, client = app_client
    headers = {
        "authorization": "Bearer secret",
        "x-serverless-authorization": "Bearer other-secret",
        "x-goog-pubsub-message-id": "m\u0000",
        "x-nul": "a\u0000b",
        "x-long": "v" * 100_000,
    }
    await assert_quarantined(app, client, job().encode(), headers)
    row = (await services_of(app).store.list_quarantined(1, 0))[0]
    assert "authorization" not in row.headers and row.message_id is None
    assert "x-serverless-authorization" not in row.headers
    assert row.headers["x-nul"] == "a\ufffdb"


def test_unstorable_ids_are_not_passed_on() -> None:
    for message_id in ["m\u0000", "m\ud800", "m" * 257]:
        try:
            message = decode_push(envelope(job(), message_id), {})
        except MalformedPush as exc:
            assert exc.message_id is None and exc.subscription is None
        else:  # an envelope with a lone surrogate is no envelope: its ids are not read at all
            assert message.message_id is None and message.subscription is None
            with pytest.raises(MalformedPush):
                parse_job(message)
    with pytest.raises(MalformedPush) as caught:
        decode_push(b"{}", {"x-goog-pubsub-message-id": "m\u0000"})
    assert caught.value.message_id is None


def test_quarantine_headers_drop_credentials_and_unstorable_text() -> None:
    kept = quarantine_headers(
        {
            "Authorization": "Bearer secret",
            "x-nul": "a\u0000b",
            "x-surrogate\ud800": "\udfff",
            "x-long": "v" * 100_000,
        }
    )
    assert not any(key.lower() == "authorization" for key in kept)
    assert kept["x-nul"] == "a\ufffdb"
    assert kept["x-surrogate\ufffd"] == "\ufffd"
    assert 0 < len(kept["x-long"]) <= 10_000
    assert all(text_problem(k) is None and text_problem(v) is None for k, v in kept.items())


async def test_quarantine_headers_are_storable_in_postgresql(app_client: AppClient) -> None:
    app, _ = app_client
    hostile = {f"x-{i}\u0000\ud800": "\u0000\udfff" * 10_000 for i in range(1_000)}
    store = services_of(app).store
    row_id = await store.quarantine("test", b"\x00\xff", quarantine_headers(hostile), None, None)
    row = (await store.list_quarantined(1, 0))[0]
    assert row.id == row_id and row.raw_body == b"\x00\xff"


# --- properties ---------------------------------------------------------------------------

HOSTILE_CHARS = st.one_of(st.characters(), st.sampled_from(["\u0000", "\ud800", "\udfff"]))
HOSTILE_TEXT = st.one_of(
    st.text(HOSTILE_CHARS, max_size=30),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "\u0000", "\ud800"]), st.integers(1, 700)),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | HOSTILE_TEXT,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(HOSTILE_TEXT, children, max_size=4)
    ),
    max_leaves=20,
)
HOSTILE_FIELD = st.one_of(
    HOSTILE_TEXT, st.integers(), st.floats(), st.none(), st.booleans(), st.just([1])
)
HOSTILE_ATTEMPT = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=5)
)
# No example database: nothing written into the working tree.
PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@PROPERTY_SETTINGS
@given(body=st.binary(max_size=600))
async def test_any_bytes_are_acknowledged(app_client: AppClient, body: bytes) -> None:
    app, client = app_client
    await assert_acknowledged(app, client, body)


@PROPERTY_SETTINGS
@given(value=JSON_VALUES)
async def test_any_json_body_is_acknowledged(app_client: AppClient, value: Any) -> None:
    app, client = app_client
    await assert_acknowledged(app, client, json.dumps(value).encode())


@PROPERTY_SETTINGS
@given(
    data=st.one_of(JSON_VALUES.map(json.dumps), st.binary(max_size=100)),
    message_id=HOSTILE_FIELD | st.just(NO_ID),
    subscription=HOSTILE_FIELD,
    attempt=HOSTILE_ATTEMPT,
)
async def test_any_envelope_is_acknowledged(
    app_client: AppClient, data: str | bytes, message_id: Any, subscription: Any, attempt: Any
) -> None:
    app, client = app_client
    await assert_acknowledged(app, client, envelope(data, message_id, subscription, attempt))


@st.composite
def jobs_with_one_hostile_field(draw: st.DrawFn) -> bytes:
    """A job envelope that is clean but for one field, so that field decides the outcome."""
    fields: dict[str, Any] = {
        "idea": "A tool library for neighbours.",
        "extra_context": {"budget": "small"},
        "message_id": str(draw(st.uuids())),
        "subscription": SUBSCRIPTION,
    }
    target = draw(st.sampled_from(sorted(fields)))
    fields[target] = draw(
        JSON_VALUES if target == "extra_context" else HOSTILE_TEXT | HOSTILE_FIELD
    )
    data = job(fields["idea"], extra_context=fields["extra_context"])
    return envelope(data, fields["message_id"], fields["subscription"])


@settings(PROPERTY_SETTINGS, max_examples=100)
@given(body=jobs_with_one_hostile_field())
async def test_any_job_is_quarantined_or_run(app_client: AppClient, body: bytes) -> None:
    app, client = app_client
    await assert_acknowledged(app, client, body)


# The reference project's publisher sends `{run_id, run_type, priority, payload}`; each of the
# last three may be absent, as the reference sends it, or anything else.
PLAIN_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=10,
)
REFERENCE_FIELDS = {
    "run_type": st.sampled_from(["initial", "revision"]),
    "priority": st.sampled_from(["normal", "high"]),
    "payload": st.dictionaries(st.text(max_size=20), PLAIN_JSON, max_size=3),
}
WIRE_FORMS = st.sampled_from(
    ["wrapped", "wrapped without messageId", "no_wrapper", "no_wrapper without message id"]
)


@st.composite
def reference_fields(draw: st.DrawFn) -> dict[str, Any]:
    """Each field absent (2 in 5), as the reference sends it (2 in 5) or anything (1 in 5), so
    that about half the jobs are valid."""
    fields: dict[str, Any] = {}
    for name, as_sent in REFERENCE_FIELDS.items():
        kind = draw(st.integers(0, 4))
        if kind >= 2:
            fields[name] = draw(as_sent if kind < 4 else JSON_VALUES | HOSTILE_FIELD)
    return fields


def reference_job_is_valid(job: dict[str, Any]) -> bool:
    """What must run: each field that is present as the reference sends it, and plain JSON."""
    return (
        job.get("run_type", "initial") in ("initial", "revision")
        and job.get("priority", "normal") in ("normal", "high")
        and isinstance(job.get("payload", {}), dict)
        and json_problem(job, allow_nul=True) is None
    )


def on_the_wire(job: dict[str, Any], form: str) -> tuple[bytes, dict[str, str]]:
    """`job` as a push request of `form` (see WIRE_FORMS): the body and its headers."""
    data = json.dumps(job)
    if form == "wrapped":
        return envelope(data, "ref-1"), {}
    if form == "wrapped without messageId":
        return envelope(data, NO_ID), {}
    headers = {"x-goog-pubsub-subscription-name": SUBSCRIPTION}
    if form == "no_wrapper":
        headers["x-goog-pubsub-message-id"] = "ref-1"
    return data.encode(), headers


async def completed_run_id(app: FastAPI, client: httpx2.AsyncClient) -> str:
    """A run that completed (made once per app): a valid job for it is a duplicate, 204."""
    run_id: str | None = getattr(app.state, "completed_run_id", None)
    if run_id is None:
        run = await services_of(app).store.create_run("A tool library for neighbours.", None)
        body = envelope(json.dumps({"run_id": run.id}), "first-delivery")
        assert (await client.post("/pubsub/push", content=body)).status_code == 204
        assert await services_of(app).store.status(run.id) == "completed"
        app.state.completed_run_id = run_id = run.id
    return run_id


@settings(max_examples=300, deadline=None, database=None)
@given(fields=reference_fields(), form=WIRE_FORMS)
def test_reference_job_fields_are_checked(fields: dict[str, Any], form: str) -> None:
    """Accepted, with or without a message id, exactly when the reference could have sent it."""
    run_id = "0b7e3c1e-5a4c-4b8e-9d61-3f2a1c0d9e8f"
    job = {"run_id": run_id, **fields}
    try:
        parsed = parse_job(decode_push(*on_the_wire(job, form)))
    except MalformedPush:
        assert not reference_job_is_valid(job)
        return
    assert reference_job_is_valid(job)
    assert parsed == Job(run_id=run_id)


@PROPERTY_SETTINGS
@given(fields=reference_fields(), form=WIRE_FORMS)
async def test_reference_jobs_run_or_are_quarantined(
    app_client: AppClient, fields: dict[str, Any], form: str
) -> None:
    """Never a 5xx: a job for a completed run is a duplicate (204) when its fields are what the
    reference sends, and quarantined (204) otherwise."""
    app, client = app_client
    job = {"run_id": await completed_run_id(app, client), **fields}
    body, headers = on_the_wire(job, form)
    expected = "run" if reference_job_is_valid(job) else "quarantined"
    assert await assert_acknowledged(app, client, body, headers) == expected


@settings(max_examples=300, deadline=None, database=None)
@given(
    body=st.one_of(st.binary(max_size=300), JSON_VALUES.map(lambda v: json.dumps(v).encode())),
    headers=st.dictionaries(
        st.sampled_from(["x-goog-pubsub-message-id", "x-goog-pubsub-subscription-name", "x-other"]),
        HOSTILE_TEXT,
    ),
)
def test_decoding_is_total(body: bytes, headers: dict[str, str]) -> None:
    """Any bytes and headers: a job or MalformedPush, and only storable ids are passed on."""
    try:
        message = decode_push(body, headers)
    except MalformedPush as exc:
        assert storable(exc.message_id, MAX_MESSAGE_ID_CHARS)
        assert storable(exc.subscription, MAX_SUBSCRIPTION_CHARS)
        return
    assert storable(message.message_id, MAX_MESSAGE_ID_CHARS)
    assert storable(message.subscription, MAX_SUBSCRIPTION_CHARS)
    try:
        parsed = parse_job(message)
    except MalformedPush:
        return
    assert isinstance(parsed, Job)
    if parsed.idea is not None:
        assert text_problem(parsed.idea) is None


# --- /v1 ----------------------------------------------------------------------------------

POISON_API_REQUESTS: dict[str, tuple[str, str, bytes | None]] = {
    "offset past int64": ("GET", "/v1/runs?offset=9223372036854775808", None),
    "negative offset": ("GET", "/v1/runs?offset=-1", None),
    "limit past int64": ("GET", "/v1/runs?limit=9223372036854775808", None),
    "naive created_after": ("GET", "/v1/runs?created_after=2024-01-01T00:00:00", None),
    "created_after before year 1 in UTC": (
        "GET",
        "/v1/runs?created_after=0001-01-01T00:00:00%2B01:00",
        None,
    ),
    "created_before after year 9999 in UTC": (
        "GET",
        "/v1/runs?created_before=9999-12-31T23:59:59-01:00",
        None,
    ),
    "NUL in created_after": ("GET", "/v1/runs?created_after=%00", None),
    "NUL run id": ("GET", "/v1/runs/%00", None),
    "run id that is no UUID": ("GET", "/v1/runs/" + "x" * 1000, None),
    "NUL in idea": ("POST", "/v1/full-review", rb'{"idea": "a\u0000b"}'),
    "lone surrogate in idea": ("POST", "/v1/full-review", rb'{"idea": "\ud800"}'),
    "NUL in extra_context": (
        "POST",
        "/v1/full-review",
        rb'{"idea": "An idea.", "extra_context": "\u0000"}',
    ),
    "lone surrogate in an extra_context key": (
        "POST",
        "/v1/full-review",
        rb'{"idea": "An idea.", "extra_context": {"\udc00": 1}}',
    ),
    "NaN in extra_context": (
        "POST",
        "/v1/full-review",
        b'{"idea": "An idea.", "extra_context": {"k": NaN}}',
    ),
    "-Infinity in extra_context": (
        "POST",
        "/v1/full-review",
        b'{"idea": "An idea.", "extra_context": {"k": [-Infinity]}}',
    ),
    "extra_context one level too deep": (
        "POST",
        "/v1/full-review",
        ('{"idea": "An idea.", "extra_context": {"k": ' + JUST_TOO_DEEP + "}}").encode(),
    ),
    "extra_context nested 10 000 deep": (
        "POST",
        "/v1/full-review",
        ('{"idea": "An idea.", "extra_context": {"k": ' + DEEP + "}}").encode(),
    ),
    "body nested 10 000 deep": ("POST", "/v1/full-review", DEEP.encode()),
    "body that is not UTF-8": ("POST", "/v1/full-review", b'{"idea": "\xff"}'),
    "body that is not JSON": ("POST", "/v1/full-review", b"{"),
}


@pytest.mark.parametrize(
    ("method", "url", "body"), POISON_API_REQUESTS.values(), ids=POISON_API_REQUESTS.keys()
)
async def test_poison_api_request_is_a_4xx_in_the_error_shape(
    app_client: AppClient, method: str, url: str, body: bytes | None
) -> None:
    _, client = app_client
    headers = {"content-type": "application/json"} if body is not None else {}
    response = await client.request(method, url, content=body, headers=headers)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()
    assert set(error) == {"code", "message", "details", "request_id", "detail"}
    assert error["detail"] == error["message"]
    assert error["request_id"] == response.headers["x-request-id"]


async def test_run_id_that_is_not_a_uuid_is_404_not_found(app_client: AppClient) -> None:
    _, client = app_client
    response = await client.get("/v1/runs/not-a-uuid")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


async def test_aware_dates_in_range_still_filter(app_client: AppClient) -> None:
    _, client = app_client
    for query in [
        "created_after=2024-01-01T00:00:00Z",
        "created_after=2024-01-01T00:00:00%2B02:00",
        "created_before=9999-12-31T23:59:59Z",
        "created_after=0001-01-01T00:00:00Z",
        "offset=2147483647",
    ]:
        response = await client.get(f"/v1/runs?{query}")
        assert response.status_code == 200, (query, response.text)


async def test_other_data_under_a_known_message_id_is_checked_as_new(
    app_client: AppClient,
) -> None:
    """A resolved message is remembered with a digest of its data: a redelivery skips parsing,
    other bytes under the same id (never from Pub/Sub) are decoded and judged afresh."""
    app, client = app_client
    valid = envelope(job("A tool library for neighbours."), "m-known", SUBSCRIPTION)
    assert await assert_acknowledged(app, client, valid) == "run"
    assert await assert_acknowledged(app, client, valid) == "run"
    poisoned = envelope(job("A tool\u0000library."), "m-known", SUBSCRIPTION)
    await assert_quarantined(app, client, poisoned)
