"""Cost: every call's tokens priced (`LLM_PRICES`), and the daily budget (`DAILY_BUDGET_USD`).

`CostMeter` prices a call with the domain's pure function and says once per model, in the log,
that a model has no price. `DailyBudget` answers whether today's spend, summed in the database
over every instance, reached the budget: then deliveries of runs not yet started are deferred
to the next UTC day (`app/service.py`), and the sweep hands them to the queue again once that
day has begun (`app/sweep.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from loguru import logger

from app.domain.models import TokenUsage
from app.domain.pricing import PriceTable, cost_usd, is_spent

# How long one reading of the day's spend stands on an instance: a delivery costs no query,
# and the budget may be overshot by what the instances spend in this time (plus the runs
# already in flight, which always finish).
SPEND_CHECK_SECONDS = 10.0

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


class CostMeter:
    """Prices calls; an unknown model is logged once per process, its cost left unknown."""

    def __init__(self, prices: PriceTable) -> None:
        self._prices = prices
        self._unpriced: set[str] = set()

    def cost(self, model: str | None, usage: TokenUsage) -> float | None:
        cost = cost_usd(self._prices, model, usage)
        if cost is None and model is not None and model not in self._unpriced:
            self._unpriced.add(model)
            logger.warning(
                "no price for model {}: the cost of its calls is unknown; add it to LLM_PRICES",
                model,
                lifecycle_event="price_unknown",
                model=model,
            )
        return cost


def budget_day(now: datetime) -> tuple[datetime, datetime]:
    """The budget's window around `now`: its UTC day, [midnight, next midnight)."""
    start = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + timedelta(days=1)


class Spend(Protocol):
    """Where the spend is summed (`app/store/spend.py`)."""

    async def spent_between(self, start: datetime, end: datetime) -> float: ...


class DailyBudget:
    """`DAILY_BUDGET_USD` against the day's spend of every instance (one cached query)."""

    def __init__(
        self,
        spend: Spend,
        limit_usd: float,
        clock: Clock = utcnow,
        check_seconds: float | None = None,
    ) -> None:
        self._spend = spend
        self.limit_usd = limit_usd
        self._clock = clock
        self._check_seconds = SPEND_CHECK_SECONDS if check_seconds is None else check_seconds
        self._lock = asyncio.Lock()
        # (when read, the day read, spent then): one reading serves every delivery a while.
        self._reading: tuple[datetime, datetime, float] | None = None
        # The day whose exhaustion this instance has announced.
        self._announced: datetime | None = None

    async def exhausted_until(self) -> datetime | None:
        """When the budget is spent: the end of its day (deferred runs wait until then);
        None while money is left. `StoreUnavailable` when the database does not answer."""
        now = self._clock()
        start, end = budget_day(now)
        spent = self._fresh(now, start)
        if spent is None:
            async with self._lock:
                spent = self._fresh(now, start)  # another delivery may have just read it
                if spent is None:
                    spent = await self._spend.spent_between(start, end)
                    self._reading = (now, start, spent)
        if not is_spent(spent, self.limit_usd):
            return None
        if self._announced != start:
            self._announced = start
            logger.error(
                "daily budget of {:g} USD spent ({:.4f} USD since {}): runs not yet started are "
                "deferred until {}; runs in flight finish",
                self.limit_usd,
                spent,
                start.isoformat(),
                end.isoformat(),
                lifecycle_event="budget_exhausted",
                daily_budget_usd=self.limit_usd,
                spent_usd=spent,
                deferred_until=end.isoformat(),
            )
        return end

    def _fresh(self, now: datetime, start: datetime) -> float | None:
        """The last reading if it is of this day and recent enough."""
        if self._reading is None:
            return None
        read_at, day, spent = self._reading
        if day != start or (now - read_at).total_seconds() >= self._check_seconds:
            return None
        return spent
