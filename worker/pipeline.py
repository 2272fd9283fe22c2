"""The staged batching engine: prepare → forward → write, joined by small bounded queues.

    submit(jobs) ─► prepare pool (fetch bytes, then decode + preprocess under a CPU semaphore)
                 ─► ready queue ─► staging thread (micro-batch on size or time; on the device,
                    on its own CUDA stream: decode JPEGs, stack, copy, cast, lay out)
                 ─► staged queue ─► model thread (forward, scores)
                 ─► write queue ─► writer thread (claim, shard, results in Redis) ─► futures

Each job gets a `Future` that resolves to its `JobResult` once its outputs are durably written,
or raises a `TransientError` that the caller retries. A permanent failure of one job is a
`failed` result for that job alone. The CPU work for batch n+1 and its staging on the device
overlap the forward pass of batch n, and the forward pass of batch n+1 overlaps the writes of
batch n.

With `image_decoder="torch"`, JPEGs are decoded by torchvision and preprocessed as tensors
(`worker/tensor_decode.py`). For a model on a GPU the prepare threads only fetch and check a
JPEG (the same limits and codes as the Pillow path, from its header); its bytes ride the ready
queue, and the staging thread decodes and preprocesses each batch's JPEGs together on the GPU
while the batch before it is forwarded. For a model on the CPU each JPEG is decoded that way on
the prepare threads, where the cores are. Other formats, CMYK JPEGs and JPEGs torchvision
cannot decode take the Pillow path; `jpeg_draft` applies only to what Pillow decodes on the
prepare threads (a JPEG torchvision failed on is decoded in full). With the default, `"pil"`,
every image is decoded and preprocessed by Pillow on the prepare threads.

The units: `PrepareStage` (worker/prepare_stage.py), `StagingStage` (worker/staging_stage.py)
with its `MicroBatcher` (worker/batcher.py) and `DeviceStager` (worker/device_stream.py),
`ModelStage` (worker/model_stage.py), both driving `BatchForward` (worker/forward.py),
`WriteStage` (worker/write_stage.py), and `Settler` (worker/settle.py), which resolves every
job's future. This module wires them together and supervises the stage threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

from control.results import ResultStore
from schemas.errors import ErrorCode, TransientError
from schemas.jobs import Job, Task
from schemas.results import JobResult, Status
from schemas.settings import Settings
from worker.device_stream import DeviceStager
from worker.forward import BatchForward
from worker.items import EncodedBatch, Item
from worker.model_stage import ModelStage
from worker.models.base import Encoder
from worker.outputs import ShardWriter
from worker.prepare import ImagePreparer
from worker.prepare_stage import PrepareStage
from worker.settle import Settler
from worker.sources import SourceReader
from worker.staging_stage import STAGED_BATCHES, PipelineStats, StagedBatch, StagingStage
from worker.write_stage import WriteStage
from worker.zeroshot import LabelEmbeddingCache

log = logging.getLogger(__name__)


class Pipeline:
    def __init__(self, settings: Settings, encoder: Encoder, reader: SourceReader,
                 writer: ShardWriter, results: ResultStore,
                 label_cache: LabelEmbeddingCache | None = None, *,
                 device_batches: bool | None = None) -> None:
        """`device_batches`: with the torch decoder, decode each batch's JPEGs on the model
        thread (default: when the model is not on the CPU)."""
        images = ImagePreparer(settings, encoder, device_batches=device_batches)
        self._results = results
        self._settle = Settler(results)
        self._ready: queue.Queue[Item] = queue.Queue(maxsize=settings.max_batch_items * 4)
        self._staged: queue.Queue[StagedBatch] = queue.Queue(maxsize=STAGED_BATCHES)
        self._to_write: queue.Queue[EncodedBatch] = queue.Queue(maxsize=2)
        self._prepare = PrepareStage(settings, reader, images, self._ready, self._settle)
        layout = torch.channels_last if settings.channels_last else torch.contiguous_format
        forward = BatchForward(encoder, images.tensor_decoder,
                               label_cache or LabelEmbeddingCache(), self._prepare, self._settle,
                               DeviceStager(encoder.device, encoder.dtype, layout))
        self.stats = PipelineStats()
        self._staging = StagingStage(settings, forward, self._prepare, self._ready, self._staged,
                                     self._settle, self.stats)
        self._model = ModelStage(forward, self._staged, self._to_write, self._settle, self.stats)
        writes = WriteStage(writer, self._to_write, self._settle)
        self._stopping = threading.Event()
        self._threads = [self._start_stage("ds-stage", self._staging.run),
                         self._start_stage("ds-model", self._model.run),
                         self._start_stage("ds-writer", writes.run)]

    def submit(self, jobs: Sequence[Job], *, attempts: int = 1, run_id: str | None = None,
               recheck: bool = False) -> list[Future[JobResult]]:
        """Admit jobs. A job settled before resolves to its stored result: found when its
        row is claimed, or, with `recheck` (a redelivered message, whose jobs may well be
        done), before it is computed, for one more round trip."""
        if not self.healthy:
            raise TransientError("the pipeline is stopped or one of its stages died",
                                 code=ErrorCode.INTERNAL)
        earlier = (self._results.get_many([job.job_id for job in jobs]) if recheck
                   else [None] * len(jobs))
        settled = [job.job_id for job, result in zip(jobs, earlier, strict=True)
                   if result is not None and result.status is Status.DONE]
        self._results.count_repeats(settled, run_id)  # done by another run, maybe
        return [self._admit(job, attempts, run_id, result).future
                for job, result in zip(jobs, earlier, strict=True)]

    @property
    def healthy(self) -> bool:
        return not self._stopping.is_set() and all(t.is_alive() for t in self._threads)

    @property
    def last_progress(self) -> float:
        """When the staging or the model stage, whichever is later, last came round its loop
        (`time.monotonic()`)."""
        return min(self._staging.last_progress, self._model.last_progress)

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work, let held items finish, then stop the stages.

        Called once every message is settled (done or requeued), so fetches that have not
        started are cancelled rather than run.
        """
        self._prepare.shutdown()
        deadline = time.monotonic() + timeout
        while self._holding() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stopping.set()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()) + 1)

    def _holding(self) -> bool:
        return not all(q.empty() for q in (self._ready, self._staged, self._to_write))

    def _admit(self, job: Job, attempts: int, run_id: str | None,
               earlier: JobResult | None) -> Item:
        item = Item(job, Future(), attempts, time.time(), run_id)
        item.timings.enqueued_at = item.enqueued_at
        if earlier is not None and earlier.status is Status.DONE:
            item.future.set_result(earlier)
        elif job.task is Task.TEXT_EMBEDDING:
            self._ready.put(item)
        else:
            self._prepare.start(item)
        return item

    def _start_stage(self, name: str, run: Callable[[threading.Event], None]) -> threading.Thread:
        thread = threading.Thread(target=self._supervise, args=(run,), name=name, daemon=True)
        thread.start()
        return thread

    def _supervise(self, run: Callable[[threading.Event], None]) -> None:
        """A stage that dies marks the pipeline unhealthy and fails what it held, loudly."""
        try:
            run(self._stopping)
        except BaseException:
            log.critical("pipeline stage %s died", threading.current_thread().name,
                         exc_info=True)
            self._stopping.set()
            self._drain_failed()
            raise

    def _drain_failed(self) -> None:
        stranded = TransientError("the worker pipeline stopped", code=ErrorCode.INTERNAL)
        for source in (self._ready, self._staged, self._to_write):
            while True:
                try:
                    entry = source.get_nowait()
                except queue.Empty:
                    break
                for item in entry.items if isinstance(entry, EncodedBatch | StagedBatch) \
                        else [entry]:
                    self._settle.retry(item, stranded)
