"""Stage 3: forward each staged batch and score it, on the one thread that owns the model.

Batches come from the staging thread (`worker/staging_stage.py`) in the order they were
collected, already on the device; the forward pass of one overlaps the staging of the next.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from worker.forward import BatchForward, retryable
from worker.items import EncodedBatch, Item
from worker.settle import Settler
from worker.staging_stage import POLL_S, PipelineStats, StagedBatch

P = TypeVar("P")


class ModelStage:
    def __init__(self, forward: BatchForward, staged: queue.Queue[StagedBatch],
                 to_write: queue.Queue[EncodedBatch], settle: Settler,
                 stats: PipelineStats) -> None:
        self._forward = forward
        self._staged = staged
        self._to_write = to_write
        self._settle = settle
        self.stats = stats
        self.last_progress = time.monotonic()

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            try:
                batch = self._staged.get(timeout=POLL_S)
            except queue.Empty:
                batch = None
            self.last_progress = time.monotonic()
            if batch is not None:
                self._encode(batch)

    def _encode(self, batch: StagedBatch) -> None:
        self.stats.forward_calls += 1
        if batch.pixels is not None:
            self._put(self._guarded(self._forward.images, batch.images, batch.pixels))
        if batch.tokens is not None:
            self._put(self._guarded(self._forward.texts, batch.texts, batch.tokens))

    def _put(self, encoded: EncodedBatch | None) -> None:
        if encoded is not None:
            self._to_write.put(encoded)

    def _guarded(self, encode: Callable[[list[Item], P], EncodedBatch | None],
                 items: list[Item], staged: P) -> EncodedBatch | None:
        """Encode one batch; anything that escapes fails that batch's jobs, never the stage
        (out of device memory is transient: those jobs are retried)."""
        try:
            return encode(items, staged)
        except Exception as exc:  # noqa: BLE001 - routed to the batch's jobs (fail logs it)
            failure = retryable(exc, "its batch")
        for item in items:
            self._settle.fail(item, failure)
        return None
