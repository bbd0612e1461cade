"""Decoding a Pub/Sub push request (wrapped or unwrapped) and the job inside it."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from app.domain.ideas import validate_extra_context, validate_idea


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
    """A wrapped envelope (JSON with `message`) or an unwrapped body with metadata headers."""
    if "x-goog-pubsub-message-id" not in headers:
        envelope = _json_object(body)
        if envelope is not None and isinstance(envelope.get("message"), dict):
            return _wrapped(envelope)
        if envelope is not None and "message" in envelope:
            raise MalformedPush("envelope field 'message' is not an object")
    return PushMessage(
        data=body,
        message_id=headers.get("x-goog-pubsub-message-id"),
        subscription=headers.get("x-goog-pubsub-subscription-name"),
        publish_time=headers.get("x-goog-pubsub-publish-time"),
        ordering_key=headers.get("x-goog-pubsub-ordering-key")
        or headers.get("x-goog-ordering-key"),
    )


def _wrapped(envelope: dict[str, Any]) -> PushMessage:
    message: dict[str, Any] = envelope["message"]
    message_id = message.get("messageId", message.get("message_id"))
    if not isinstance(message_id, str) or not message_id:
        raise MalformedPush("envelope message has no messageId")
    subscription = envelope.get("subscription")
    if not isinstance(subscription, str):
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
        publish_time=publish_time if isinstance(publish_time, str) else None,
        ordering_key=ordering_key if isinstance(ordering_key, str) else None,
        delivery_attempt=attempt if isinstance(attempt, int) and attempt > 0 else None,
    )


def parse_job(message: PushMessage) -> Job:
    """The job in the message data (JSON), or in its attributes when the data is empty."""
    fields: dict[str, Any]
    if message.data.strip():
        parsed = _json_object(message.data)
        if parsed is None:
            raise MalformedPush("message data is not a JSON object")
        fields = parsed
    elif message.attributes:
        fields = dict(message.attributes)
    else:
        raise MalformedPush("message has neither data nor attributes")

    if "run_id" in fields:
        try:
            return Job(run_id=str(uuid.UUID(str(fields["run_id"]))))
        except ValueError as exc:
            raise MalformedPush("run_id is not a UUID") from exc
    if "idea" in fields:
        if not isinstance(fields["idea"], str):
            raise MalformedPush("idea is not a string")
        if not message.source_key:
            raise MalformedPush("a self-contained job needs a message id to be idempotent")
        try:
            idea = validate_idea(fields["idea"])
            extra = validate_extra_context(fields.get("extra_context"))
        except ValueError as exc:
            raise MalformedPush(f"invalid job: {exc}") from exc
        return Job(idea=idea, extra_context=extra)
    raise MalformedPush("job has neither run_id nor idea")


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def encode_wrapped(
    job: dict[str, Any],
    message_id: str,
    subscription: str,
    delivery_attempt: int | None = None,
    publish_time: str = "1970-01-01T00:00:00Z",
) -> bytes:
    """A wrapped push envelope as Pub/Sub sends it (for in-process delivery and tools)."""
    envelope: dict[str, Any] = {
        "message": {
            "data": base64.b64encode(json.dumps(job).encode()).decode(),
            "attributes": {},
            "messageId": message_id,
            "publishTime": publish_time,
        },
        "subscription": subscription,
    }
    if delivery_attempt is not None:
        envelope["deliveryAttempt"] = delivery_attempt
    return json.dumps(envelope).encode()
