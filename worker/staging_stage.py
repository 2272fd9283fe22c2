"""Stage 2: micro-batch what is ready and stage it for the model, on the staging thread.

The loop drives a `MicroBatcher` with the ready queue and the clock: it takes whatever is
queued, then waits for batch-mates only while the batcher says the batch is not yet due. Each
batch is then staged (`BatchForward.stage_images`: JPEGs decoded on the device, rows stacked,
copied, cast and laid out on the staging stream; texts tokenized) and handed to the model
thread through a small bounded queue, so batch n+1 is made ready while batch n is forwarded,
and staging waits when the model thread falls behind.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from schemas.errors import ErrorCode, TransientError
from schemas.settings import Settings
from worker.batcher import MicroBatcher
from worker.device_stream import StagedPixels
from worker.forward import BatchForward, retryable
from worker.items import Item
from worker.models.base import TokenizedTexts
from worker.prepare_stage import PrepareStage
from worker.settle import Settler

T = TypeVar("T")

POLL_S = 0.1
_STEP_S = 0.002  # the longest one wait for a batch-mate, before the batch is looked at again
STAGED_BATCHES = 2  # staged batches waiting for the model thread, at most


@dataclass
class StagedBatch:
    """One micro-batch, ready for the forward pass: its images on the device, its texts
    tokenized (either part may be empty)."""

    images: list[Item] = field(default_factory=list)
    pixels: StagedPixels | None = None
    texts: list[Item] = field(default_factory=list)
    tokens: TokenizedTexts | None = None

    @property
    def items(self) -> list[Item]:
        return [*self.images, *self.texts]


@dataclass
class PipelineStats:
    """Counters a test or the benchmark reads."""

    forward_calls: int = 0  # batches forwarded (model thread)
    batch_sizes: list[int] = field(default_factory=list)  # batches collected (staging thread)


class StagingStage:
    def __init__(self, settings: Settings, forward: BatchForward, prepare: PrepareStage,
                 ready: queue.Queue[Item], staged: queue.Queue[StagedBatch],
                 settle: Settler, stats: PipelineStats) -> None:
        self._forward = forward
        self._prepare = prepare
        self._ready = ready
        self._staged = staged
        self._settle = settle
        self._batcher = MicroBatcher[Item](settings.max_batch_items,
                                           settings.max_batch_wait_ms / 1000)
        self.stats = stats
        self.last_progress = time.monotonic()

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            batch = self._collect()
            self.last_progress = time.monotonic()
            if batch:
                self.stats.batch_sizes.append(len(batch))
                self._hand_on(self._stage(batch), stopping)

    def _collect(self) -> list[Item]:
        """Up to `max_batch_items`, waiting at most `max_batch_wait_ms` after the first item,
        and not at all when nothing more is on its way."""
        try:
            self._batcher.add(self._ready.get(timeout=POLL_S))
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

    def _stage(self, batch: list[Item]) -> StagedBatch:
        images = [item for item in batch if item.pixels is not None or item.jpeg is not None]
        texts = [item for item in batch if item.pixels is None and item.jpeg is None]
        pixels = self._guarded(self._forward.stage_images, images)
        tokens = self._guarded(self._forward.stage_texts, texts)
        return StagedBatch(images if pixels is not None else [], pixels,
                           texts if tokens is not None else [], tokens)

    def _guarded(self, stage: Callable[[list[Item]], T | None], items: list[Item]) -> T | None:
        """Stage one part of a batch; anything that escapes fails those jobs, never the stage
        (out of device memory is transient: those jobs are retried)."""
        try:
            return stage(items)
        except Exception as exc:  # noqa: BLE001 - routed to the batch's jobs (fail logs it)
            failure = retryable(exc, "its batch")
        for item in items:
            self._settle.fail(item, failure)
        return None

    def _hand_on(self, staged: StagedBatch, stopping: threading.Event) -> None:
        """Queue the staged batch for the model thread, waiting while the queue is full."""
        if not staged.items:
            return
        while not stopping.is_set():
            try:
                self._staged.put(staged, timeout=POLL_S)
                return
            except queue.Full:
                self.last_progress = time.monotonic()  # waiting on the model is progress
        closing = TransientError("the pipeline is closing", code=ErrorCode.INTERNAL)
        for item in staged.items:
            self._settle.retry(item, closing)
