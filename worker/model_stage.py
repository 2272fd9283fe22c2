"""Stage 2: micro-batch what is ready and forward it, on the one thread that owns the model.

The loop drives a `MicroBatcher` with the ready queue and the clock: it takes whatever is
queued, then waits for batch-mates only while the batcher says the batch is not yet due.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from schemas.errors import ErrorCode, TransientError
from schemas.settings import Settings
from worker.batcher import MicroBatcher
from worker.forward import BatchForward
from worker.items import EncodedBatch, Item
from worker.prepare_stage import PrepareStage
from worker.settle import Settler

_POLL_S = 0.1
_STEP_S = 0.002  # the longest one wait for a batch-mate, before the batch is looked at again


@dataclass
class PipelineStats:
    """Counters a test or the benchmark reads; updated by the model thread only."""

    forward_calls: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class ModelStage:
    def __init__(self, settings: Settings, forward: BatchForward, prepare: PrepareStage,
                 ready: queue.Queue[Item], to_write: queue.Queue[EncodedBatch],
                 settle: Settler) -> None:
        self._forward = forward
        self._prepare = prepare
        self._ready = ready
        self._to_write = to_write
        self._settle = settle
        self._batcher = MicroBatcher[Item](settings.max_batch_items,
                                           settings.max_batch_wait_ms / 1000)
        self.stats = PipelineStats()
        self.last_progress = time.monotonic()

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            batch = self._collect()
            self.last_progress = time.monotonic()
            if batch:
                self._encode(batch)

    def _collect(self) -> list[Item]:
        """Up to `max_batch_items`, waiting at most `max_batch_wait_ms` after the first item,
        and not at all when nothing more is on its way."""
        try:
            self._batcher.add(self._ready.get(timeout=_POLL_S))
        except queue.Empty:
            return []
        while not self._batcher.full:
            try:
                self._batcher.add(self._ready.get_nowait())
            except queue.Empty:
                if self._batcher.due(more_coming=self._prepare.more_coming()):
                    break
                self._wait_for_more()
        return self._batcher.flush()

    def _wait_for_more(self) -> None:
        wait = max(0.0, min(self._batcher.time_left(), _STEP_S))
        with contextlib.suppress(queue.Empty):
            self._batcher.add(self._ready.get(timeout=wait))

    def _encode(self, batch: list[Item]) -> None:
        self.stats.forward_calls += 1
        self.stats.batch_sizes.append(len(batch))
        images = [item for item in batch if item.pixels is not None or item.jpeg is not None]
        texts = [item for item in batch if item.pixels is None and item.jpeg is None]
        for encode, items in ((self._forward.images, images), (self._forward.texts, texts)):
            encoded = self._guarded(encode, items)
            if encoded is not None:
                self._to_write.put(encoded)

    def _guarded(self, encode: Callable[[list[Item]], EncodedBatch | None],
                 items: list[Item]) -> EncodedBatch | None:
        """Encode one batch; anything that escapes fails that batch's jobs, never the stage
        (out of device memory is transient: those jobs are retried)."""
        try:
            return encode(items)
        except torch.OutOfMemoryError as exc:
            failure: Exception = TransientError(f"out of device memory: {exc}",
                                                code=ErrorCode.INTERNAL)
        except Exception as exc:  # noqa: BLE001 - routed to the batch's jobs (fail logs it)
            failure = exc
        for item in items:
            self._settle.fail(item, failure)
        return None
