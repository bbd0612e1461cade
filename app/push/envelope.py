"""Decoding a Pub/Sub push request (wrapped or unwrapped) and the job inside it."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

from app.domain.ideas import (
    json_problem,
    make_storable,
    text_problem,
    validate_extra_context,
    validate_idea,
)
from app.domain.models import Priority, RunType

# What the reference's publisher may send beside `run_id`.
RUN_TYPES: tuple[str, ...] = get_args(RunType)
PRIORITIES: tuple[str, ...] = get_args(Priority)

# Column sizes of quarantined_messages (message_id, subscription) and runs (source_key).
MAX_MESSAGE_ID_CHARS = 256
MAX_SUBSCRIPTION_CHARS = 512
MAX_SOURCE_KEY_CHARS = 512
MAX_DELIVERY_ATTEMPT = 2**31 - 1  # a PostgreSQL integer
MAX_HEADER_CHARS = 4096
MAX_HEADERS = 100
# A publisher's trace context rides in the message attributes under this prefix
# (`googclient_traceparent`, `googclient_tracestate`), as Google's Pub/Sub client libraries put it.
TRACE_ATTRIBUTE_PREFIX = "googclient_"
_TRACE_FIELDS = ("traceparent", "tracestate")


class MalformedPush(ValueError):
    """The request or its data cannot become a job; it is quarantined and acknowledged."""

    def __init__(
        self, reason: str, message_id: str | None = None, subscription: str | None = None
    ) -> None:
        super().__init__(reason)
        self.message_id = message_id
        self.subscription = subscription


@dataclass(frozen=True)
class PushMessage:
    data: bytes
    message_id: str | None
    subscription: str | None
    attributes: dict[str, str] = field(default_factory=dict)
    publish_time: str | None = None
    ordering_key: str | None = None
    delivery_attempt: int | None = None

    @property
    def source_key(self) -> str | None:
        """Identity of the message across redeliveries: subscription + messageId."""
        if not self.message_id:
            return None
        return f"{self.subscription or ''}/{self.message_id}"


@dataclass(frozen=True)
class Job:
    """Either a reference to a run created by the API, or a self-contained idea."""

    run_id: str | None = None
    idea: str | None = None
    extra_context: str | dict[str, Any] | None = None


def decode_push(body: bytes, headers: Mapping[str, str]) -> PushMessage:
    """A wrapped envelope (JSON with `message`) or an unwrapped body with metadata headers.

    Total: any body and headers give a PushMessage or raise MalformedPush.
    """
    if "x-goog-pubsub-message-id" not in headers:
        try:
            envelope = _json_object(body)
        except MalformedPush:
            envelope = None  # not an envelope: the body may be unwrapped data
        if envelope is not None and isinstance(envelope.get("message"), dict):
            return _wrapped(envelope)
        if envelope is not None and "message" in envelope:
            raise MalformedPush("envelope field 'message' is not an object")
    message_id = _identifier(
        headers.get("x-goog-pubsub-message-id"), "message id header", MAX_MESSAGE_ID_CHARS
    )
    subscription = _identifier(
        headers.get("x-goog-pubsub-subscription-name"),
        "subscription header",
        MAX_SUBSCRIPTION_CHARS,
    )
    return PushMessage(
        data=body,
        message_id=message_id,
        subscription=subscription,
        publish_time=_clean(headers.get("x-goog-pubsub-publish-time")),
        ordering_key=_clean(headers.get("x-goog-pubsub-ordering-key"))
        or _clean(headers.get("x-goog-ordering-key")),
    )


def _wrapped(envelope: dict[str, Any]) -> PushMessage:
    message: dict[str, Any] = envelope["message"]
    message_id = message.get("messageId", message.get("message_id"))
    if message_id is None or message_id == "":
        # No id: a `{run_id}` job is still one (the run's lease makes it run once); parse_job
        # refuses a self-contained job, whose run is found by its message id.
        message_id = None
    elif isinstance(message_id, str):
        message_id = _identifier(message_id, "messageId", MAX_MESSAGE_ID_CHARS)
    else:
        raise MalformedPush("envelope messageId is not a string")
    subscription = envelope.get("subscription")
    if isinstance(subscription, str):
        subscription = _identifier(subscription, "subscription", MAX_SUBSCRIPTION_CHARS)
    else:
        subscription = None
    raw_data = message.get("data")
    if raw_data is None or raw_data == "":
        data = b""
    elif isinstance(raw_data, str):
        try:
            data = base64.b64decode(raw_data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedPush(
                "message data is not valid base64", message_id, subscription
            ) from exc
    else:
        raise MalformedPush("message data is not a base64 string", message_id, subscription)
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
    ):
        raise MalformedPush(
            "message attributes must map strings to strings", message_id, subscription
        )
    attempt = envelope.get("deliveryAttempt")
    publish_time = message.get("publishTime", message.get("publish_time"))
    ordering_key = message.get("orderingKey", message.get("ordering_key"))
    return PushMessage(
        data=data,
        message_id=message_id,
        subscription=subscription,
        attributes=attributes,
        publish_time=_clean(publish_time),
        ordering_key=_clean(ordering_key),
        delivery_attempt=_delivery_attempt(attempt),
    )


def _identifier(value: str | None, what: str, max_chars: int) -> str | None:
    """`value` when it can be stored in its column; MalformedPush (no ids kept) otherwise."""
    if value is None:
        return None
    problem = text_problem(value)
    if problem is None and len(value) > max_chars:
        problem = f"more than {max_chars} characters"
    if problem is not None:
        raise MalformedPush(f"{what} has {problem}")
    return value


def _clean(value: Any) -> str | None:
    """An optional metadata string, dropped when it is not a storable, bounded string."""
    if not isinstance(value, str) or len(value) > MAX_HEADER_CHARS or text_problem(value):
        return None
    return value


def _delivery_attempt(value: Any) -> int | None:
    # bool is an int subclass: `true` is no attempt count.
    if type(value) is int and 1 <= value <= MAX_DELIVERY_ATTEMPT:
        return value
    return None


def parse_job(message: PushMessage) -> Job:
    """The job in the message data (JSON), or in its attributes when the data is empty.

    `{run_id, run_type?, priority?, payload?}` (the reference's publisher) needs no message id:
    the run is its identity. `{idea, extra_context?}` does, to map redeliveries to one run.
    Other keys are ignored.
    """
    fields: dict[str, Any]
    if message.data.strip():
        fields = _json_object(message.data)
    elif message.attributes:
        fields = dict(message.attributes)
    else:
        raise MalformedPush("message has neither data nor attributes")

    _check_reference_fields(fields)
    if "run_id" in fields:
        try:
            return Job(run_id=str(uuid.UUID(fields["run_id"])))
        except (TypeError, ValueError, AttributeError) as exc:
            raise MalformedPush("run_id is not a UUID") from exc
    if "idea" in fields:
        if not isinstance(fields["idea"], str):
            raise MalformedPush("idea is not a string")
        if not message.source_key:
            raise MalformedPush("a self-contained job needs a message id to be idempotent")
        if len(message.source_key) > MAX_SOURCE_KEY_CHARS:
            raise MalformedPush(
                f"subscription and message id exceed {MAX_SOURCE_KEY_CHARS} characters together"
            )
        try:
            idea = validate_idea(fields["idea"])
            extra = validate_extra_context(fields.get("extra_context"))
        except ValueError as exc:
            raise MalformedPush(f"invalid job: {exc}") from exc
        return Job(idea=idea, extra_context=extra)
    raise MalformedPush("job has neither run_id nor idea")


def _check_reference_fields(fields: Mapping[str, Any]) -> None:
    """The fields the reference project's publisher sends beside `run_id`, when present.

    They are informational (the run row is the source of truth) but must be what the reference
    sends: anything else is a malformed job. The hostile value itself is never echoed.
    """
    for name, allowed in (("run_type", RUN_TYPES), ("priority", PRIORITIES)):
        if name in fields:
            value = fields[name]
            if not isinstance(value, str) or value not in allowed:
                raise MalformedPush(f"{name} is not one of {', '.join(allowed)}")
    if "payload" in fields and not isinstance(fields["payload"], dict):
        raise MalformedPush("payload is not a JSON object")


def _json_object(raw: bytes) -> dict[str, Any]:
    """The JSON object in `raw`; MalformedPush unless it is plain JSON (see json_problem).

    NUL may pass here: the fields taken from the object are checked where they are read.
    """
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError as exc:
        raise MalformedPush("message data is JSON nested too deep") from exc
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise MalformedPush("message data is not valid JSON") from exc
    if not isinstance(value, dict):
        raise MalformedPush("message data is not a JSON object")
    problem = json_problem(value, allow_nul=True)
    if problem is not None:
        raise MalformedPush(f"message data is JSON with {problem}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def envelope_attributes(body: bytes) -> dict[str, str]:
    """The message attributes of a wrapped envelope; empty for any other body. Never raises:
    it is read before the request is authenticated or checked (for its trace context only)."""
    try:
        envelope = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    message = envelope.get("message") if isinstance(envelope, dict) else None
    attributes = message.get("attributes") if isinstance(message, dict) else None
    if not isinstance(attributes, dict):
        return {}
    return {k: v for k, v in attributes.items() if isinstance(k, str) and isinstance(v, str)}


def trace_carrier(attributes: Mapping[str, str]) -> dict[str, str]:
    """The W3C trace context fields (`traceparent`, `tracestate`) a publisher put in the
    attributes, under their own names; bounded, so a hostile value costs nothing to parse."""
    carrier: dict[str, str] = {}
    for name in _TRACE_FIELDS:
        value = attributes.get(TRACE_ATTRIBUTE_PREFIX + name)
        if value is not None and len(value) <= MAX_HEADER_CHARS:
            carrier[name] = value
    return carrier


_CREDENTIAL_HEADERS = frozenset({"authorization", "x-serverless-authorization"})


def quarantine_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The request headers to keep with a quarantined message: storable as JSON, no credentials.

    The credentials (`authorization`, and `x-serverless-authorization` that Cloud Run verifies
    in its place) are dropped; NUL and lone surrogates become U+FFFD and keys and values are
    cut at MAX_HEADER_CHARS, at most MAX_HEADERS of them, so any request can be kept.
    """
    kept: dict[str, str] = {}
    for key, value in headers.items():
        if key.lower() in _CREDENTIAL_HEADERS:
            continue
        if len(kept) >= MAX_HEADERS:
            break
        kept[_storable(key)] = _storable(value)
    return kept


def _storable(text: str) -> str:
    return make_storable(text[:MAX_HEADER_CHARS])


def encode_wrapped(
    job: dict[str, Any],
    message_id: str,
    subscription: str,
    delivery_attempt: int | None = None,
    publish_time: str = "1970-01-01T00:00:00Z",
    attributes: Mapping[str, str] | None = None,
) -> bytes:
    """A wrapped push envelope as Pub/Sub sends it (for in-process delivery and tools)."""
    envelope: dict[str, Any] = {
        "message": {
            "data": base64.b64encode(json.dumps(job).encode()).decode(),
            "attributes": dict(attributes or {}),
            "messageId": message_id,
            "publishTime": publish_time,
        },
        "subscription": subscription,
    }
    if delivery_attempt is not None:
        envelope["deliveryAttempt"] = delivery_attempt
    return json.dumps(envelope).encode()
