"""Logging: readable text in development, one Cloud Logging JSON object per line in production."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from loguru import logger
from opentelemetry import trace

if TYPE_CHECKING:
    from loguru import Message, Record

# Set from X-Cloud-Trace-Context for the duration of a request; the current span's trace, when
# one is recording (TRACING_ENABLED), takes precedence.
trace_context: ContextVar[str | None] = ContextVar("trace_context", default=None)

_SEVERITY = {
    "TRACE": "DEBUG",
    "DEBUG": "DEBUG",
    "INFO": "INFO",
    "SUCCESS": "INFO",
    "WARNING": "WARNING",
    "ERROR": "ERROR",
    "CRITICAL": "CRITICAL",
}


def configure_logging(production: bool, level: str, project_id: str | None) -> None:
    """Replace loguru's default sink; route the standard library's logging through it."""
    logger.remove()
    # loguru's `diagnose` prints each traceback frame's local values, which include bearer
    # tokens, API keys and request bodies; `backtrace` would print yet more frames of them.
    if production:
        logger.add(
            _json_sink(project_id), level=level, enqueue=False, backtrace=False, diagnose=False
        )
    else:
        logger.add(sys.stderr, level=level, format=_text_format, backtrace=False, diagnose=False)
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers = [_InterceptHandler()]
        logging.getLogger(name).propagate = False
    logging.getLogger("uvicorn.access").handlers = []
    logging.getLogger("uvicorn.access").propagate = False


def _text_format(record: Record) -> str:
    line = "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}"
    if record["extra"]:
        line += " <dim>{extra}</dim>"
    return line + "\n{exception}"


def cloud_logging_record(record: Record, project_id: str | None) -> dict[str, Any]:
    """The JSON object Cloud Logging reads from a container's stdout for one log record."""
    entry: dict[str, Any] = {
        "severity": _SEVERITY.get(record["level"].name, "DEFAULT"),
        "message": record["message"],
        "time": record["time"].isoformat(),
        "logger": record["name"],
    }
    for key, value in record["extra"].items():
        entry[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
    span = trace.get_current_span()
    if span.is_recording():
        # The span this line was logged in (tracing on): Logs Explorer shows the line in its
        # trace, under that span.
        context = span.get_span_context()
        entry["logging.googleapis.com/trace"] = _trace_name(
            trace.format_trace_id(context.trace_id), project_id
        )
        entry["logging.googleapis.com/spanId"] = trace.format_span_id(context.span_id)
        entry["logging.googleapis.com/trace_sampled"] = context.trace_flags.sampled
    elif cloud_trace := trace_context.get():
        entry["logging.googleapis.com/trace"] = _trace_name(
            cloud_trace.split("/", 1)[0], project_id
        )
    if record["exception"] is not None:
        entry["exception"] = "".join(traceback.format_exception(*record["exception"]))
    return entry


def _trace_name(trace_id: str, project_id: str | None) -> str:
    return f"projects/{project_id}/traces/{trace_id}" if project_id else trace_id


def _json_sink(project_id: str | None) -> Any:
    def sink(message: Message) -> None:
        line = json.dumps(cloud_logging_record(message.record, project_id), default=str)
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    return sink


class _InterceptHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())
