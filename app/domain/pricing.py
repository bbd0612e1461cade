"""What tokens cost: a price table per model turns a call's token usage into US dollars.

Pure: the table comes from the settings (`LLM_PRICES`), the usage from the LLM adapter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field

from app.domain.models import TokenUsage

TOKENS_PER_PRICE_UNIT = 1_000_000
# Costs are rounded to 1e-10 USD, so sums read 0.00375, not 0.0037500000000000003.
COST_DECIMALS = 10

# A provider's dated snapshot of a model ("gpt-5.1-2025-11-13") is priced as the model itself.
_SNAPSHOT_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}$")


class ModelPrice(BaseModel):
    """US dollars per million tokens of one model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_1m_usd: float = Field(ge=0.0, allow_inf_nan=False)
    output_per_1m_usd: float = Field(ge=0.0, allow_inf_nan=False)


PriceTable = Mapping[str, ModelPrice]

# OpenAI's standard-tier list prices (developers.openai.com/api/docs/pricing, read 2026-11),
# for the models this service is configured with by default (OPENAI_MODEL=gpt-5.1) and their
# usual alternatives. The cached-input discount is not applied, so the figures are an upper
# bound. Override or extend them with LLM_PRICES; `offline` is the offline provider (free).
DEFAULT_PRICES: dict[str, ModelPrice] = {
    "gpt-5.1": ModelPrice(input_per_1m_usd=1.25, output_per_1m_usd=10.00),
    "gpt-5": ModelPrice(input_per_1m_usd=1.25, output_per_1m_usd=10.00),
    "gpt-5-mini": ModelPrice(input_per_1m_usd=0.25, output_per_1m_usd=2.00),
    "gpt-5-nano": ModelPrice(input_per_1m_usd=0.05, output_per_1m_usd=0.40),
    "gpt-4.1": ModelPrice(input_per_1m_usd=2.00, output_per_1m_usd=8.00),
    "gpt-4.1-mini": ModelPrice(input_per_1m_usd=0.40, output_per_1m_usd=1.60),
    "gpt-4o-mini": ModelPrice(input_per_1m_usd=0.15, output_per_1m_usd=0.60),
    "offline": ModelPrice(input_per_1m_usd=0.0, output_per_1m_usd=0.0),
}


def price_of(table: PriceTable, model: str) -> ModelPrice | None:
    """The model's price: its own entry, else that of the model a dated snapshot is of."""
    price = table.get(model)
    if price is None:
        base = _SNAPSHOT_SUFFIX.sub("", model)
        if base != model:
            price = table.get(base)
    return price


def cost_usd(table: PriceTable, model: str | None, usage: TokenUsage) -> float | None:
    """What `usage` of `model` cost; None when the model has no price (cost unknown).

    No tokens cost nothing, whatever the model (a step that made no call, a reused review).
    """
    if usage.input_tokens == 0 and usage.output_tokens == 0:
        return 0.0
    price = None if model is None else price_of(table, model)
    if price is None:
        return None
    cost = (
        usage.input_tokens * price.input_per_1m_usd + usage.output_tokens * price.output_per_1m_usd
    ) / TOKENS_PER_PRICE_UNIT
    return round(cost, COST_DECIMALS)


def add_costs(costs: Iterable[float | None]) -> float | None:
    """The sum of known costs; unknown (None) as soon as one of them is."""
    total = 0.0
    for cost in costs:
        if cost is None:
            return None
        total += cost
    return round(total, COST_DECIMALS)


def is_spent(spent_usd: float, budget_usd: float) -> bool:
    """A budget is spent once the spend reaches it (rounding below a micro-dollar ignored)."""
    return spent_usd >= budget_usd or math.isclose(spent_usd, budget_usd, abs_tol=1e-6)
