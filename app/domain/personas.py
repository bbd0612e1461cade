"""The five personas, their weights and the decision thresholds: the one place they live."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Persona:
    persona_id: str
    name: str
    weight: float
    focus: str

    @property
    def step_name(self) -> str:
        return f"review_{self.persona_id}"


PERSONAS: tuple[Persona, ...] = (
    Persona("architect", "Architect", 0.25, "design, scalability, maintainability"),
    Persona("critic", "Critic", 0.25, "risks, edge cases, failure modes"),
    Persona("optimist", "Optimist", 0.15, "strengths, opportunities, feasibility"),
    Persona(
        "security_guardian",
        "Security Guardian",
        0.20,
        "security, privacy, compliance; holds a veto over approval",
    ),
    Persona("user_advocate", "User Advocate", 0.15, "usability, accessibility, user value"),
)
PERSONAS_BY_ID = {p.persona_id: p for p in PERSONAS}

APPROVE_THRESHOLD = 0.80  # inclusive
REVISE_THRESHOLD = 0.60  # inclusive
DISSENT_THRESHOLD = 0.60  # on approve, a persona below this files a minority report
VETO_PERSONA_ID = "security_guardian"
# A revision re-runs a persona whose parent review scored below this (or raised a blocking issue).
RERUN_CONFIDENCE_THRESHOLD = 0.70

EXPAND_STEP = "expand"
AGGREGATE_STEP = "aggregate_decision"
STEP_NAMES: tuple[str, ...] = (
    EXPAND_STEP,
    *(p.step_name for p in PERSONAS),
    AGGREGATE_STEP,
)


def validate_policy() -> None:
    """Fail loudly if the weights or thresholds above were edited into nonsense."""
    ids = [p.persona_id for p in PERSONAS]
    if len(set(ids)) != len(ids):
        raise ValueError("persona ids must be unique")
    if any(not 0.0 < p.weight <= 1.0 for p in PERSONAS):
        raise ValueError("persona weights must be in (0, 1]")
    if not math.isclose(math.fsum(p.weight for p in PERSONAS), 1.0, abs_tol=1e-9):
        raise ValueError("persona weights must sum to 1.0")
    if not 0.0 < REVISE_THRESHOLD < APPROVE_THRESHOLD <= 1.0:
        raise ValueError("thresholds must satisfy 0 < revise < approve <= 1")
    if not 0.0 < RERUN_CONFIDENCE_THRESHOLD <= 1.0:
        raise ValueError("the re-run threshold must be in (0, 1]")
    if VETO_PERSONA_ID not in PERSONAS_BY_ID:
        raise ValueError("the veto persona must be one of the personas")
