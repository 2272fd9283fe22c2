"""Stage 1: fetch each image's bytes, then decode and preprocess them, on a pool of threads.

`fetch_threads` items are in hand at once; the CPU work among them is bounded by a semaphore of
`preprocess_threads`. A prepared item goes on the ready queue; one that fails is settled alone.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from schemas.errors import ErrorCode, TransientError
from schemas.settings import Settings
from worker.items import Item, ms_since
from worker.prepare import ImagePreparer
from worker.settle import Settler
from worker.sources import SourceReader
from worker.tensor_decode import CheckedJpeg


class PrepareStage:
    def __init__(self, settings: Settings, reader: SourceReader, images: ImagePreparer,
                 ready: queue.Queue[Item], settle: Settler) -> None:
        self._reader = reader
        self._images = images
        self._ready = ready
        self._settle = settle
        self._pool = ThreadPoolExecutor(settings.fetch_threads, thread_name_prefix="ds-fetch")
        self._cpu_slots = threading.BoundedSemaphore(settings.preprocess_threads)
        self._preparing = 0
        self._preparing_lock = threading.Lock()

    def start(self, item: Item, undecoded: bytes | None = None) -> None:
        """Fetch and prepare the item on the pool; or, given `undecoded` (a JPEG torchvision
        could not decode), have Pillow decode it."""
        self._count(1)
        try:
            self._pool.submit(self._prepare, item, undecoded)
        except RuntimeError:  # the pool is shut down: the pipeline is closing
            self._count(-1)
            self._settle.retry(item, TransientError("the pipeline is closing",
                                                    code=ErrorCode.INTERNAL))

    def more_coming(self) -> bool:
        """Whether an item is still being prepared, or already waits on the ready queue."""
        # Counted before the queue is looked at: an item leaves the count only once it is queued.
        with self._preparing_lock:
            return self._preparing > 0 or not self._ready.empty()

    def shutdown(self) -> None:
        """Cancel the fetches that have not started; wait for those that have."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _count(self, change: int) -> None:
        with self._preparing_lock:
            self._preparing += change

    def _prepare(self, item: Item, undecoded: bytes | None) -> None:
        try:
            prepare: Callable[[bytes], torch.Tensor | CheckedJpeg] = self._images.with_pillow
            if undecoded is None:
                prepare, undecoded = self._images.prepare, self._fetch(item)
            self._decode(item, prepare, undecoded)
            self._ready.put(item)
        except Exception as exc:  # noqa: BLE001 - every failure is routed to the job alone
            self._settle.fail(item, exc)
        finally:
            self._count(-1)

    def _fetch(self, item: Item) -> bytes:
        start = time.perf_counter()
        blob = self._reader.read(item.job.image or "", version=item.job.version,
                                 etag=item.job.etag)
        item.etag = item.job.etag or blob.etag
        item.timings.fetch_ms = ms_since(start)
        return blob.data

    def _decode(self, item: Item, prepare: Callable[[bytes], torch.Tensor | CheckedJpeg],
                data: bytes) -> None:
        with self._cpu_slots:
            start = time.perf_counter()
            prepared = prepare(data)
            item.timings.decode_ms += ms_since(start)
        if isinstance(prepared, CheckedJpeg):
            item.jpeg = prepared  # decoded with its batch on the model thread
        else:
            item.pixels = prepared
