"""What the pages show, computed in Python so templates stay plain: labels, formats, the chart."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from markupsafe import Markup
from pydantic import ValidationError

from app.domain.personas import (
    AGGREGATE_STEP,
    APPROVE_THRESHOLD,
    EXPAND_STEP,
    PERSONAS,
    REVISE_THRESHOLD,
)

# An idea (10 000 characters) and extra context (50 000), percent-encoded: well below this.
MAX_FORM_BYTES = 1024 * 1024
MAX_FORM_FIELDS = 100
STEP_LABELS = {
    EXPAND_STEP: "Expand the idea",
    **{p.step_name: f"{p.name} review" for p in PERSONAS},
    AGGREGATE_STEP: "Decision",
}
FINISHED = frozenset({"completed", "failed"})
_DATE_ONLY = re.compile(r"\d{4}-\d{2}-\d{2}")


class FormTooLarge(Exception):
    """A form body beyond MAX_FORM_BYTES or MAX_FORM_FIELDS."""


def parse_form(body: bytes) -> dict[str, str]:
    """An `application/x-www-form-urlencoded` body, first value of each field."""
    if len(body) > MAX_FORM_BYTES:
        raise FormTooLarge
    try:
        pairs = parse_qsl(
            body.decode("utf-8", errors="replace"),
            keep_blank_values=True,
            max_num_fields=MAX_FORM_FIELDS,
        )
    except ValueError:  # more fields than any of the pages' forms has
        raise FormTooLarge from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        fields.setdefault(name, value)
    return fields


def field_errors(exc: ValidationError) -> dict[str, str]:
    """The first message for each field, worded as the API's 422 details word it."""
    errors: dict[str, str] = {}
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "form"
        errors.setdefault(name, error["msg"])
    return errors


def list_query(params: Mapping[str, str]) -> dict[str, str]:
    """A runs-list query as the API reads it: empty form fields dropped, and a plain date
    (what `<input type=date>` sends) read as that whole UTC day."""
    query = {name: value for name, value in params.items() if value != ""}
    for name, time_of_day in (("start_date", "00:00:00"), ("end_date", "23:59:59.999999")):
        value = query.get(name)
        if value is not None and _DATE_ONLY.fullmatch(value):
            query[name] = f"{value}T{time_of_day}Z"
    return query


def status_text(status: str) -> str:
    """`very_large` -> `Very large`: a status or label as the page words it."""
    return status.replace("_", " ").capitalize()


def when(value: datetime | None) -> str:
    """An instant in UTC, to the second."""
    return "—" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def clock(value: datetime | None) -> Markup | str:
    """A time of day in a `<time>` element carrying the whole instant (the timeline's times:
    its run's date is in the page's header)."""
    if value is None:
        return "—"
    return Markup('<time datetime="{}">{}</time>').format(
        value.isoformat(), value.strftime("%H:%M:%S")
    )


def money(value: float | None) -> str:
    """US dollars; `unknown` where a model had no price."""
    return "unknown" if value is None else f"${value:.4f}"


def score(value: float | None) -> str:
    """A confidence to two places."""
    return "—" if value is None else f"{value:.2f}"


def lines(value: Any) -> str:
    """A proposal list field as the revise form edits it: one item per line."""
    if isinstance(value, list):
        return "\n".join(str(item) for item in value)
    return "" if value is None else str(value)


# The decision chart: an SVG in user units, scaled to its box by CSS.
CHART_WIDTH = 420
_LEFT = 8
_PLOT = 384  # user units for a confidence of 1.0
_TOP = 36  # room for the threshold labels
_ROW = 40


@dataclass(frozen=True)
class Bar:
    """One persona's weighted contribution, drawn from where the previous ones ended."""

    persona_id: str
    label: str
    contribution: float
    x: float
    y: float
    width: float
    text_y: float


@dataclass(frozen=True)
class Threshold:
    """A decision threshold's line across the chart, labelled above it."""

    value: float
    label: str
    x: float
    text_y: float


@dataclass(frozen=True)
class Chart:
    """A waterfall of the weighted contributions: the last bar ends at the overall confidence,
    so where it stops against the threshold lines is the decision."""

    bars: list[Bar]
    total: Bar
    thresholds: list[Threshold]
    height: float
    width: int = CHART_WIDTH


def decision_chart(decision: Mapping[str, Any]) -> Chart:
    """The chart of a stored decision's per-persona breakdown."""
    bars: list[Bar] = []
    start = 0.0
    for row, part in enumerate(decision.get("breakdown", [])):
        contribution = float(part["weighted_contribution"])
        bars.append(
            Bar(
                persona_id=str(part["persona_id"]),
                label=(
                    f"{part['persona_name']}: {part['weight']:.2f} \N{MULTIPLICATION SIGN} "
                    f"{part['confidence_score']:.2f} = {contribution:.3f}"
                ),
                contribution=contribution,
                x=_LEFT + start * _PLOT,
                y=_TOP + row * _ROW + 20,
                width=contribution * _PLOT,
                text_y=_TOP + row * _ROW + 14,
            )
        )
        start += contribution
    overall = float(decision.get("overall_weighted_confidence", start))
    row = len(bars)
    total = Bar(
        persona_id="overall",
        label=f"Overall: {overall:.3f} ({decision.get('decision', '')})",
        contribution=overall,
        x=_LEFT,
        y=_TOP + row * _ROW + 20,
        width=overall * _PLOT,
        text_y=_TOP + row * _ROW + 14,
    )
    thresholds = [
        Threshold(value, f"{name} ≥ {value:.2f}", _LEFT + value * _PLOT, text_y)
        for value, name, text_y in (
            (REVISE_THRESHOLD, "revise", 12),
            (APPROVE_THRESHOLD, "approve", 28),
        )
    ]
    return Chart(
        bars=bars,
        total=total,
        thresholds=thresholds,
        height=_TOP + (row + 1) * _ROW + 4,
    )
