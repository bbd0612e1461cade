"""A dict that keeps at most `limit` entries, dropping the oldest first.

For the per-instance memories of the push path (verified tokens, finished runs, the run of a
pushed message): each answers a redelivery storm without the work it remembers, and none may
grow without bound.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedDict(dict[K, V]):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: K, value: V) -> None:
        if key not in self and len(self) >= self.limit:
            del self[next(iter(self))]
        super().__setitem__(key, value)
