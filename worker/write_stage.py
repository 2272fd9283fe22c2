"""Stage 3: each encoded batch's durable writes, then its results in Redis, then its futures."""

from __future__ import annotations

import queue
import threading
import time

from schemas.results import JobResult
from worker.items import EncodedBatch, Item, ms_since
from worker.outputs import OutputRow, ShardWriter
from worker.settle import Settler, done_result

_POLL_S = 0.1


class WriteStage:
    def __init__(self, writer: ShardWriter, to_write: queue.Queue[EncodedBatch],
                 settle: Settler) -> None:
        self._writer = writer
        self._to_write = to_write
        self._settle = settle

    def run(self, stopping: threading.Event) -> None:
        """Write until stopped and nothing is left to write."""
        while not stopping.is_set() or not self._to_write.empty():
            try:
                batch = self._to_write.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            try:
                self._write(batch)
            except Exception as exc:  # noqa: BLE001 - routed to the batch's jobs
                for item in batch.items:
                    self._settle.fail(item, exc)

    def _write(self, batch: EncodedBatch) -> None:
        start = time.perf_counter()
        rows = _rows(batch)
        outcomes = self._writer.write(rows, batch.modality)
        finished: list[tuple[Item, JobResult]] = []
        for item, row, outcome in zip(batch.items, rows, outcomes, strict=True):
            if outcome.busy is not None:
                self._settle.retry(item, outcome.busy)
            elif outcome.already_done:
                self._settle.already_done(item)
            else:
                item.timings.write_ms = ms_since(start)
                item.timings.finished_at = time.time()
                finished.append((item, done_result(item, outcome.committed or row,
                                                   outcome.location)))
        self._settle.done(finished)


def _rows(batch: EncodedBatch) -> list[OutputRow]:
    return [OutputRow(item.job, vector, item.etag, labels, truncated, item.run_id,
                      item.attempts)
            for item, vector, labels, truncated
            in zip(batch.items, batch.embeddings, batch.labels, batch.truncated, strict=True)]
