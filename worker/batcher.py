"""The micro-batcher's decisions, as pure logic: buffer items, and say when to flush.

A batch is due when it is full, when `max_wait_s` has passed since its first item, or at once
when nothing more can join it (nothing is being prepared or queued): a lone item never waits.
The caller feeds it and waits in between; the clock is injected, so nothing here sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class MicroBatcher(Generic[T]):
    def __init__(self, max_items: int, max_wait_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._max_items = max_items
        self._max_wait_s = max_wait_s
        self._clock = clock
        self._items: list[T] = []
        self._deadline = 0.0

    def add(self, item: T) -> None:
        """Buffer `item`; the first item of a batch starts its wait."""
        if not self._items:
            self._deadline = self._clock() + self._max_wait_s
        self._items.append(item)

    @property
    def full(self) -> bool:
        return len(self._items) >= self._max_items

    def time_left(self) -> float:
        """Seconds until the batch's wait runs out (negative once it has)."""
        return self._deadline - self._clock()

    def due(self, *, more_coming: bool) -> bool:
        """Whether to flush now. `more_coming`: an item is still being prepared (or already
        queued) and could join this batch; it holds the flush until the wait runs out."""
        if not self._items:
            return False
        return self.full or not more_coming or self.time_left() <= 0

    def flush(self) -> list[T]:
        batch, self._items = self._items, []
        return batch
