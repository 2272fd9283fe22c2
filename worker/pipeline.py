"""The staged batching engine: prepare → forward → write, joined by small bounded queues.

    submit(jobs) ─► prepare pool (fetch bytes, then decode + preprocess under a CPU semaphore)
                 ─► ready queue ─► model thread (micro-batch on size or time, forward, scores)
                 ─► write queue ─► writer thread (claim, shard, results in Redis) ─► futures

Each job gets a `Future` that resolves to its `JobResult` once its outputs are durably written,
or raises a `TransientError` that the caller retries. A permanent failure of one job is a
`failed` result for that job alone. The CPU work for batch n+1 overlaps the forward pass of
batch n, and the forward pass of batch n+1 overlaps the writes of batch n.

With `image_decoder="torch"`, JPEGs are decoded by torchvision and preprocessed as tensors
(`worker/tensor_decode.py`). For a model on a GPU the prepare threads only fetch and check a
JPEG (the same limits and codes as the Pillow path, from its header); its bytes ride the ready
queue, and the model thread decodes and preprocesses each batch's JPEGs together on the GPU just
before the forward. For a model on the CPU each JPEG is decoded that way on the prepare threads,
where the cores are. Other formats, CMYK JPEGs and JPEGs torchvision cannot decode take the
Pillow path; `jpeg_draft` applies only to what Pillow decodes on the prepare threads (a JPEG
torchvision failed on is decoded in full). With the default, `"pil"`, every image is decoded
and preprocessed by Pillow on the prepare threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import redis
import torch

from schemas.errors import DualstreamError, ErrorCode, PermanentError, TransientError
from schemas.jobs import Job, Task
from schemas.results import ErrorInfo, JobResult, LabelScore, OutputLocation, Status, Timings
from schemas.settings import Settings
from worker.models.base import Encoder
from worker.outputs import OutputRow, ShardWriter
from worker.prepare import ImagePreparer, stack_rows
from worker.results import ResultStore
from worker.storage import SourceReader
from worker.tensor_decode import CheckedJpeg, TensorDecoder
from worker.zeroshot import LabelEmbeddingCache, score

log = logging.getLogger(__name__)
_POLL_S = 0.1


@dataclass(eq=False)
class Item:
    job: Job
    future: Future[JobResult]
    attempts: int
    enqueued_at: float
    etag: str | None = None
    pixels: torch.Tensor | None = None
    jpeg: CheckedJpeg | None = None  # image_decoder="torch": decoded on the model thread
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True)
class EncodedBatch:
    items: list[Item]
    embeddings: np.ndarray
    labels: list[list[LabelScore] | None]
    truncated: list[bool]
    modality: str


@dataclass
class PipelineStats:
    """Counters a test or the benchmark reads; updated by the model thread only."""

    forward_calls: int = 0
    batch_sizes: list[int] = field(default_factory=list)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000


class Pipeline:
    def __init__(self, settings: Settings, encoder: Encoder, reader: SourceReader,
                 writer: ShardWriter, results: ResultStore,
                 label_cache: LabelEmbeddingCache | None = None, *,
                 device_batches: bool | None = None) -> None:
        """`device_batches`: with the torch decoder, decode each batch's JPEGs on the model
        thread (default: when the model is not on the CPU)."""
        self._settings = settings
        self._encoder = encoder
        self._reader = reader
        self._writer = writer
        self._results = results
        self._labels = label_cache or LabelEmbeddingCache()
        self._images = ImagePreparer(settings, encoder, device_batches=device_batches)
        self._ready: queue.Queue[Item] = queue.Queue(maxsize=settings.max_batch_items * 4)
        self._to_write: queue.Queue[EncodedBatch] = queue.Queue(maxsize=2)
        self._prepare = ThreadPoolExecutor(settings.fetch_threads, thread_name_prefix="ds-fetch")
        self._cpu_slots = threading.BoundedSemaphore(settings.preprocess_threads)
        self._preparing = 0
        self._preparing_lock = threading.Lock()
        self._stopping = threading.Event()
        self.stats = PipelineStats()
        self.last_progress = time.monotonic()
        self._threads = [
            threading.Thread(target=self._supervise, args=(self._model_loop,),
                             name="ds-model", daemon=True),
            threading.Thread(target=self._supervise, args=(self._write_loop,),
                             name="ds-writer", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    # Public ------------------------------------------------------------------------------
    def submit(self, jobs: Sequence[Job], *, attempts: int = 1) -> list[Future[JobResult]]:
        if not self.healthy:
            raise TransientError("the pipeline is stopped or one of its stages died",
                                 code=ErrorCode.INTERNAL)
        futures: list[Future[JobResult]] = []
        already_done = self._results.begin([job.job_id for job in jobs])
        for job, done in zip(jobs, already_done, strict=True):
            item = Item(job, Future(), attempts, time.time())
            item.timings.enqueued_at = item.enqueued_at
            futures.append(item.future)
            if done:
                self._resolve_existing(item)
            elif job.task is Task.TEXT_EMBEDDING:
                self._ready.put(item)
            else:
                self._start_preparing(item)
        return futures

    @property
    def healthy(self) -> bool:
        return not self._stopping.is_set() and all(t.is_alive() for t in self._threads)

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work, let held items finish, then stop the stages.

        Called once every message is settled (done or requeued), so fetches that have not
        started are cancelled rather than run.
        """
        self._prepare.shutdown(wait=True, cancel_futures=True)
        deadline = time.monotonic() + timeout
        while (not self._ready.empty() or not self._to_write.empty()) and \
                time.monotonic() < deadline:
            time.sleep(0.02)
        self._stopping.set()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()) + 1)

    # Stage 1: fetch, decode, preprocess (many threads; CPU work bounded by a semaphore) ---
    def _start_preparing(self, item: Item, undecoded: bytes | None = None) -> None:
        """Fetch and prepare the item on the pool; or, given `undecoded` (a JPEG torchvision
        could not decode), have Pillow decode it."""
        with self._preparing_lock:
            self._preparing += 1
        try:
            self._prepare.submit(self._prepare_image, item, undecoded)
        except RuntimeError:  # the pool is shut down: the pipeline is closing
            with self._preparing_lock:
                self._preparing -= 1
            self._fail(item, TransientError("the pipeline is closing", code=ErrorCode.INTERNAL))

    def _prepare_image(self, item: Item, undecoded: bytes | None) -> None:
        try:
            prepare: Callable[[bytes], torch.Tensor | CheckedJpeg] = self._images.with_pillow
            if undecoded is None:
                start = time.perf_counter()
                blob = self._reader.read(item.job.image or "")
                item.etag = item.job.etag or blob.etag
                item.timings.fetch_ms = _ms_since(start)
                prepare, undecoded = self._images.prepare, blob.data
            with self._cpu_slots:
                start = time.perf_counter()
                prepared = prepare(undecoded)
                item.timings.decode_ms += _ms_since(start)
            if isinstance(prepared, CheckedJpeg):
                item.jpeg = prepared  # decoded with its batch on the model thread
            else:
                item.pixels = prepared
            self._ready.put(item)
        except Exception as exc:  # noqa: BLE001 - every failure is routed to the job alone
            self._fail(item, exc)
        finally:
            with self._preparing_lock:
                self._preparing -= 1

    # Stage 2: micro-batch and forward (one thread owns the model) --------------------------
    def _model_loop(self) -> None:
        while not self._stopping.is_set():
            batch = self._collect()
            self.last_progress = time.monotonic()
            if not batch:
                continue
            self.stats.forward_calls += 1
            self.stats.batch_sizes.append(len(batch))
            images = [item for item in batch if item.pixels is not None or item.jpeg is not None]
            texts = [item for item in batch if item.pixels is None and item.jpeg is None]
            for encode, items in ((self._encode_images, images), (self._encode_texts, texts)):
                encoded = self._encode_batch(encode, items)
                if encoded is not None:
                    self._to_write.put(encoded)

    def _encode_batch(self, encode: Callable[[list[Item]], EncodedBatch | None],
                      items: list[Item]) -> EncodedBatch | None:
        """Encode one batch; anything that escapes fails that batch's jobs, never the stage
        (out of device memory is transient: those jobs are retried)."""
        try:
            return encode(items)
        except torch.OutOfMemoryError as exc:
            failure: Exception = TransientError(f"out of device memory: {exc}",
                                                code=ErrorCode.INTERNAL)
        except Exception as exc:  # noqa: BLE001 - routed to the batch's jobs (_fail logs it)
            failure = exc
        for item in items:
            self._fail(item, failure)
        return None

    def _collect(self) -> list[Item]:
        """Up to `max_batch_items`, waiting at most `max_batch_wait_ms` after the first item,
        and not at all when nothing more is on its way."""
        try:
            batch = [self._ready.get(timeout=_POLL_S)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self._settings.max_batch_wait_ms / 1000
        while len(batch) < self._settings.max_batch_items:
            try:
                batch.append(self._ready.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._nothing_coming():
                break
            try:
                batch.append(self._ready.get(timeout=min(remaining, 0.002)))
            except queue.Empty:
                continue
        return batch

    def _nothing_coming(self) -> bool:
        with self._preparing_lock:
            return self._preparing == 0 and self._ready.empty()

    def _encode_images(self, items: list[Item]) -> EncodedBatch | None:
        if self._images.tensor_decoder is not None:
            self._decode_on_device(items, self._images.tensor_decoder)
        if not items:
            return None
        start = time.perf_counter()
        pixels = self._stack(items)
        embeddings = self._forward_isolated(items, pixels, self._encoder.encode_images)
        if embeddings is None:
            return None
        for item in items:
            item.pixels = None  # release the tensor before the write stage
        labels = self._zero_shot(items, embeddings)
        self._stamp(items, "encode_ms", _ms_since(start))
        return EncodedBatch(items, embeddings.numpy(), labels, [False] * len(items), "image")

    def _decode_on_device(self, items: list[Item], decoder: TensorDecoder) -> None:
        """Decode the batch's JPEGs in one call. One that torchvision cannot decode goes back
        to the prepare threads for Pillow (which decides its fate) and joins a later batch:
        Pillow on the model thread would hold up the device."""
        pending = [(item, jpeg) for item in items if (jpeg := item.jpeg) is not None]
        if not pending:
            return
        start = time.perf_counter()
        rows = decoder.try_pixels([jpeg for _, jpeg in pending])
        elapsed = _ms_since(start)
        for (item, jpeg), row in zip(pending, rows, strict=True):
            item.jpeg = None
            item.timings.decode_ms += elapsed
            if row is None:
                self._start_preparing(item, jpeg.data)
            else:
                item.pixels = row
        items[:] = [item for item in items if item.pixels is not None]

    def _stack(self, items: list[Item]) -> torch.Tensor:
        rows = [row for item in items if (row := item.pixels) is not None]
        return stack_rows(rows, self._encoder.device)

    def _encode_texts(self, items: list[Item]) -> EncodedBatch | None:
        if not items:
            return None
        start = time.perf_counter()
        tokens = self._encoder.tokenize([item.job.text or "" for item in items])
        embeddings = self._encoder.encode_texts(tokens)
        self._stamp(items, "encode_ms", _ms_since(start))
        return EncodedBatch(items, embeddings.numpy(), [None] * len(items),
                            list(tokens.truncated), "text")

    def _forward_isolated(self, items: list[Item], pixels: torch.Tensor,
                          forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """Forward the batch; if it fails, forward items one by one so only the culprit fails."""
        try:
            return forward(pixels)
        except Exception:
            log.exception("batch forward failed; isolating the failing item")
        survivors, rows = [], []
        for item, one in zip(items, pixels, strict=True):
            try:
                rows.append(forward(one.unsqueeze(0))[0])
                survivors.append(item)
            except Exception as exc:  # noqa: BLE001
                self._fail(item, exc)
        items[:] = survivors
        return torch.stack(rows) if rows else None

    def _zero_shot(self, items: list[Item],
                   embeddings: torch.Tensor) -> list[list[LabelScore] | None]:
        labels: list[list[LabelScore] | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            if item.job.zero_shot is not None:
                groups.setdefault(item.job.zero_shot.model_dump_json(), []).append(i)
        for rows in groups.values():
            options = items[rows[0]].job.zero_shot
            assert options is not None
            scored = score(self._encoder, embeddings[rows], options, self._labels)
            for row, result in zip(rows, scored, strict=True):
                labels[row] = result
        return labels

    @staticmethod
    def _stamp(items: list[Item], name: str, value: float) -> None:
        for item in items:
            setattr(item.timings, name, value)

    # Stage 3: durable writes, then results, then futures ----------------------------------
    def _write_loop(self) -> None:
        while not self._stopping.is_set() or not self._to_write.empty():
            try:
                batch = self._to_write.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            try:
                self._write(batch)
            except Exception as exc:  # noqa: BLE001
                for item in batch.items:
                    self._fail(item, exc)

    def _write(self, batch: EncodedBatch) -> None:
        start = time.perf_counter()
        rows = [OutputRow(item.job, vector, item.etag, labels, truncated)
                for item, vector, labels, truncated
                in zip(batch.items, batch.embeddings, batch.labels, batch.truncated, strict=True)]
        outcomes = self._writer.write(rows, batch.modality)
        finished: list[tuple[Item, JobResult]] = []
        for item, row, outcome in zip(batch.items, rows, outcomes, strict=True):
            if outcome.busy is not None:
                item.future.set_exception(outcome.busy)
            elif outcome.already_done:
                self._resolve_existing(item)
            else:
                item.timings.write_ms = _ms_since(start)
                item.timings.finished_at = time.time()
                finished.append((item, self._done_result(item, row, outcome.location)))
        self._results.put_many([result for _, result in finished], clear_claims=True)
        for item, result in finished:
            item.future.set_result(result)

    def _done_result(self, item: Item, row: OutputRow,
                     location: OutputLocation | None) -> JobResult:
        return JobResult(
            job_id=item.job.job_id, status=Status.DONE, task=item.job.task, model=item.job.model,
            source=item.job.source, labels=row.labels,
            embedding=row.embedding.tolist() if item.job.return_embedding else None,
            embedding_dim=int(row.embedding.shape[-1]), text_truncated=row.text_truncated,
            output=location, attempts=item.attempts, timings=item.timings,
        )

    # Failures -------------------------------------------------------------------------------
    def _fail(self, item: Item, exc: BaseException) -> None:
        if item.future.done():
            return
        if isinstance(exc, TransientError):
            item.future.set_exception(exc)
            return
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            item.future.set_exception(TransientError(f"Redis unreachable: {exc}",
                                                     code=ErrorCode.TRANSIENT_BROKER))
            return
        if not isinstance(exc, PermanentError):
            log.exception("job %s failed unexpectedly", item.job.job_id, exc_info=exc)
        code = exc.code if isinstance(exc, DualstreamError) else ErrorCode.INTERNAL
        message = (exc.message if isinstance(exc, DualstreamError)
                   else f"{type(exc).__name__}: {exc}")
        result = JobResult(
            job_id=item.job.job_id, status=Status.FAILED, task=item.job.task,
            model=item.job.model, source=item.job.source,
            error=ErrorInfo(code=code, message=message), attempts=item.attempts,
            timings=item.timings,
        )
        try:
            self._results.put_many([result])
        except Exception as write_exc:  # noqa: BLE001
            item.future.set_exception(TransientError(f"recording the failure failed: {write_exc}",
                                                     code=ErrorCode.TRANSIENT_BROKER))
            return
        item.future.set_result(result)

    def _resolve_existing(self, item: Item) -> None:
        existing = self._results.get(item.job.job_id)
        if existing is None:
            item.future.set_exception(TransientError("result vanished; retrying",
                                                     code=ErrorCode.TRANSIENT_BROKER))
        else:
            item.future.set_result(existing)

    def _supervise(self, loop: Callable[[], None]) -> None:
        """A stage that dies marks the pipeline unhealthy and fails what it held, loudly."""
        try:
            loop()
        except BaseException:
            log.critical("pipeline stage %s died", threading.current_thread().name,
                         exc_info=True)
            self._stopping.set()
            self._drain_failed()
            raise

    def _drain_failed(self) -> None:
        stranded = TransientError("the worker pipeline stopped", code=ErrorCode.INTERNAL)
        for source in (self._ready, self._to_write):
            while True:
                try:
                    entry = source.get_nowait()
                except queue.Empty:
                    break
                for item in entry.items if isinstance(entry, EncodedBatch) else [entry]:
                    if not item.future.done():
                        item.future.set_exception(stranded)
