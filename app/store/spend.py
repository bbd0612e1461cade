"""What the LLM calls cost, summed over every instance: the daily budget's one query."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select

from app.store.base import Repository
from app.store.tables import StepProgress


class SpendStore(Repository):
    async def spent_between(self, start: datetime, end: datetime) -> float:
        """US dollars of the calls whose cost was added in [start, end), by every instance.

        Steps of unknown cost (a model without a price) count nothing: they cannot be priced.
        """
        result = await self._statement(
            select(func.coalesce(func.sum(StepProgress.cost_usd), 0.0)).where(
                StepProgress.spent_at >= start, StepProgress.spent_at < end
            )
        )
        return float(result.scalar_one())
