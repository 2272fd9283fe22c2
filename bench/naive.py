"""Mode c, the naive baseline: one Celery task per image (or text), no micro-batching.

This is what a first Celery version of the service would look like: each message carries one
job, and its task does everything in line: mark it running, fetch, decode, preprocess, a
forward pass of batch 1, score, write a one-row shard through the same `ShardWriter` (claims
included) and store the result in Redis (a text job: tokenize, a forward pass of batch 1,
write). The durable outputs and results are the same as dualstream's, so the two modes do the
same work; only the batching and the pipeline differ.

    python -m bench.naive [--pool threads|prefork] [--concurrency N]   # settings: DUALSTREAM_*
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import click
from celery import Celery

from schemas.errors import ErrorCode
from schemas.jobs import Job
from schemas.keys import RedisKeys
from schemas.results import ErrorInfo, JobResult, Status, Timings
from schemas.settings import Settings

TASK_NAME = "bench.naive.process"
QUEUE = "bench.naive"


def create_naive_app(settings: Settings, *, pool: str = "threads", concurrency: int = 4) -> Celery:
    app = Celery("dualstream-naive", set_as_current=False)
    app.conf.update({
        "broker_url": settings.redis_dsn,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_pool": pool,
        "worker_concurrency": concurrency,
        "worker_hijack_root_logger": False,
        "task_default_queue": QUEUE,
    })

    @app.task(name=TASK_NAME)
    def process(payload: dict[str, Any]) -> None:
        _state(settings).handle(Job.model_validate(payload))

    _ = process
    return app


@dataclass
class _State:
    """What one naive worker process holds: the model, clients and writer."""

    settings: Settings

    def __post_init__(self) -> None:
        import torch

        from control.connections import redis_client
        from control.objects import output_store
        from control.results import ResultStore
        from worker.models.loader import load_encoder
        from worker.outputs import ShardWriter
        from worker.prepare import ImagePreparer
        from worker.sources import SourceReader
        from worker.zeroshot import LabelEmbeddingCache

        settings = self.settings
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
        self.encoder = load_encoder(
            settings.model, device=settings.device, dtype=settings.dtype,
            channels_last=settings.channels_last, compile=settings.compile,
        )
        self.results = ResultStore(redis_client(settings), RedisKeys(settings.key_prefix),
                                   settings.result_ttl_s)
        self.writer = ShardWriter(output_store(settings), self.results,
                                  worker=f"naive-{os.getpid()}", lease_s=settings.claim_lease_s)
        self.reader = SourceReader(settings)
        self.labels = LabelEmbeddingCache()
        self.images = ImagePreparer(settings, self.encoder, device_batches=False)

    def handle(self, job: Job) -> None:
        from control.results import Settlement

        if self.results.statuses([job.job_id])[0] is Status.DONE:
            return
        timings = Timings(enqueued_at=time.time())
        try:
            result = self._run(job, timings)
        except Exception as exc:  # noqa: BLE001 - the job fails alone, with its error
            timings.finished_at = time.time()
            result = JobResult(job_id=job.job_id, status=Status.FAILED, task=job.task,
                               model=job.model, source=job.source, timings=timings,
                               error=ErrorInfo(code=ErrorCode.INTERNAL,
                                               message=repr(exc)[:500]))
        if result.status is Status.FAILED:  # a done job's record came with its row
            self.results.fail([Settlement(result, source=job.source)])

    def _run(self, job: Job, timings: Timings) -> JobResult:
        from worker.outputs import OutputRow
        from worker.zeroshot import score

        if job.text is not None:
            return self._run_text(job, timings)
        blob = self.reader.read(job.image or "")
        pixels = self.images.pixels(blob.data)
        embedding = self.encoder.encode_images(pixels.unsqueeze(0))
        labels = (score(self.encoder, embedding, job.zero_shot, self.labels)[0]
                  if job.zero_shot else None)
        row = OutputRow(job, embedding.numpy()[0], job.etag or blob.etag, labels, False)
        outcome = self.writer.write([row], "image")[0]
        timings.finished_at = time.time()
        return JobResult(job_id=job.job_id, status=Status.DONE, task=job.task, model=job.model,
                         source=job.source, labels=labels, output=outcome.location,
                         embedding_dim=int(embedding.shape[-1]), timings=timings)

    def _run_text(self, job: Job, timings: Timings) -> JobResult:
        from worker.outputs import OutputRow

        tokens = self.encoder.tokenize([job.text or ""])
        embedding = self.encoder.encode_texts(tokens)
        truncated = tokens.truncated[0]
        row = OutputRow(job, embedding.numpy()[0], None, None, truncated)
        outcome = self.writer.write([row], "text")[0]
        timings.finished_at = time.time()
        return JobResult(job_id=job.job_id, status=Status.DONE, task=job.task, model=job.model,
                         source=job.source, output=outcome.location, text_truncated=truncated,
                         embedding_dim=int(embedding.shape[-1]), timings=timings)


_states: dict[int, _State] = {}
_states_lock = threading.Lock()


def _state(settings: Settings) -> _State:
    """Built on first use in each process (prefork children load their own model)."""
    with _states_lock:
        if os.getpid() not in _states:
            _states[os.getpid()] = _State(settings)
        return _states[os.getpid()]


@click.command()
@click.option("--pool", type=click.Choice(["threads", "prefork", "solo"]), default="threads")
@click.option("--concurrency", type=int, default=4)
@click.option("--loglevel", default="WARNING")
def main(pool: str, concurrency: int, loglevel: str) -> None:
    """Run the naive worker on its own queue."""
    settings = Settings()
    app = create_naive_app(settings, pool=pool, concurrency=concurrency)
    app.worker_main(["worker", f"--pool={pool}", f"--concurrency={concurrency}", "-Q", QUEUE,
                     "-n", "naive@%h", f"--loglevel={loglevel}", "--without-gossip",
                     "--without-mingle", "--without-heartbeat"])


if __name__ == "__main__":
    main()
