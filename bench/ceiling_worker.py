"""Mode a, the ceiling: fetch → decode → preprocess → forward → write in one process, no queue.

It uses the worker's own pieces (`SourceReader`, `decode_image`, the encoder's
`preprocess_image` and `encode_images`, `zeroshot.score` with a label cache) and writes the
same shard layout (`.npy`, `.parquet`, then the manifest), but has no broker, no Redis
results, no claims and no acknowledgements. Fetch, decode and preprocess run on a small thread
pool that keeps a window of images ahead of the forward pass, so CPU work overlaps the forward
as well as one process can; the batch size is swept and the best one is reported.

For texts (`TextCeiling`) the loop is tokenize → forward → write: each batch is tokenized on
one pool thread while the batch before it is forwarded.

It runs in its own process (started by `bench.ceiling.CeilingProcess`): it measures the
forward pass, the single-item latency and the batch-size sweep once, then runs the throughput
loop at the best batch size on each `run` command read from stdin, until `quit`:

    python -m bench.ceiling_worker CONFIG.json
"""

from __future__ import annotations

import io
import json
import os
import resource
import statistics
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.ceiling import CeilingConfig
from bench.procs import CpuWindow
from control.objects import LocalOutputStore
from schemas.jobs import Job
from schemas.keys import ShardPaths
from schemas.settings import Settings
from worker.models.base import Encoder, TokenizedTexts
from worker.models.loader import load_encoder
from worker.prepare import ImagePreparer
from worker.sources import SourceReader
from worker.tensor_decode import CheckedJpeg
from worker.zeroshot import LabelEmbeddingCache, score


@dataclass
class Prepared:
    job: Job
    pixels: torch.Tensor | CheckedJpeg  # a JPEG left for the batch's decode on the GPU
    etag: str | None


def _settings(config: CeilingConfig) -> Settings:
    return Settings(_env_file=None, local_root=config.image_dir,  # type: ignore[call-arg]
                    output_uri=Path(config.output_dir).as_uri(), **config.settings)


def _encoder(config: CeilingConfig, settings: Settings) -> Encoder:
    return load_encoder(config.spec, device=config.device, dtype=config.dtype,
                        channels_last=settings.channels_last, compile=settings.compile)


class Ceiling:
    def __init__(self, config: CeilingConfig) -> None:
        self.config = config
        settings = _settings(config)
        self.reader = SourceReader(settings)
        self.store = LocalOutputStore(settings.output_uri)
        self.encoder = _encoder(config, settings)
        self.images = ImagePreparer(settings, self.encoder)  # decodes as the worker would
        self.labels = LabelEmbeddingCache()
        self.jobs = [Job.model_validate(raw) for raw in config.jobs]

    def warm(self) -> None:
        """Label embeddings, the first forward."""
        self.finish([self.prepare(self.jobs[0])])

    # One item's stages ---------------------------------------------------------------------
    def prepare(self, job: Job) -> Prepared:
        blob = self.reader.read(job.image or "")
        return Prepared(job, self.images.prepare(blob.data), blob.etag)

    def finish(self, batch: Sequence[Prepared]) -> None:
        """Forward, score and write one shard."""
        embeddings = self.encoder.encode_images(self.images.batch([p.pixels for p in batch]))
        options = batch[0].job.zero_shot
        labels = (score(self.encoder, embeddings, options, self.labels) if options
                  else [None] * len(batch))
        write_shard(self.store, [p.job for p in batch], embeddings.numpy(),
                    etags=[p.etag for p in batch], labels=labels)

    # Measurements ------------------------------------------------------------------------
    def forward_ms(self, batch_size: int, repeats: int = 5) -> float:
        """Fastest of `repeats` forward passes of a batch of `batch_size`, after a warm-up
        pass (the fastest, not the median: the machine may be shared)."""
        pixels = self.images.batch(
            [self.prepare(job).pixels for job in self.jobs[:batch_size]])
        return _fastest_ms(lambda: self.encoder.encode_images(pixels), repeats)

    def latency(self, count: int) -> list[float]:
        """One item at a time, end to end: fetch, decode, preprocess, forward, score, write."""
        times = []
        for job in self.jobs[:count]:
            start = time.perf_counter()
            self.finish([self.prepare(job)])
            times.append((time.perf_counter() - start) * 1000)
        return times

    def throughput(self, jobs: Sequence[Job], batch_size: int) -> dict[str, Any]:
        def run() -> int:
            shards = 0
            with ThreadPoolExecutor(self.config.prepare_threads, "ceiling-prep") as pool:
                for batch in _batches(self._prepared(pool, jobs, batch_size), batch_size):
                    self.finish(batch)
                    shards += 1
            return shards

        return _measured(run, len(jobs), batch_size)

    def _prepared(self, pool: ThreadPoolExecutor, jobs: Sequence[Job],
                  batch_size: int) -> Iterator[Prepared]:
        """Prepared items in order, keeping a window of two batches being prepared ahead."""
        window = 2 * batch_size + self.config.prepare_threads
        pending: deque[Future[Prepared]] = deque()
        upcoming = iter(jobs)
        pending.extend(pool.submit(self.prepare, job) for job in islice(upcoming, window))
        while pending:
            prepared = pending.popleft().result()
            following = next(upcoming, None)
            if following is not None:
                pending.append(pool.submit(self.prepare, following))
            yield prepared


class TextCeiling:
    """The ceiling for text-embedding jobs: tokenize → forward → write, each batch tokenized
    on a pool thread while the batch before it is forwarded."""

    def __init__(self, config: CeilingConfig) -> None:
        self.config = config
        settings = _settings(config)
        self.store = LocalOutputStore(settings.output_uri)
        self.encoder = _encoder(config, settings)
        self.jobs = [Job.model_validate(raw) for raw in config.jobs]

    def tokenize(self, jobs: Sequence[Job]) -> TokenizedTexts:
        return self.encoder.tokenize([job.text or "" for job in jobs])

    def finish(self, jobs: Sequence[Job], tokens: TokenizedTexts) -> None:
        """Forward and write one shard."""
        embeddings = self.encoder.encode_texts(tokens).numpy()
        write_shard(self.store, jobs, embeddings, etags=[None] * len(jobs),
                    labels=[None] * len(jobs), truncated=tokens.truncated, modality="text")

    def warm(self) -> None:
        self.finish(self.jobs[:1], self.tokenize(self.jobs[:1]))

    def forward_ms(self, batch_size: int, repeats: int = 5) -> float:
        tokens = self.tokenize(self.jobs[:batch_size])
        return _fastest_ms(lambda: self.encoder.encode_texts(tokens), repeats)

    def latency(self, count: int) -> list[float]:
        """One text at a time, end to end: tokenize, forward, write."""
        times = []
        for job in self.jobs[:count]:
            start = time.perf_counter()
            self.finish([job], self.tokenize([job]))
            times.append((time.perf_counter() - start) * 1000)
        return times

    def throughput(self, jobs: Sequence[Job], batch_size: int) -> dict[str, Any]:
        batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]

        def run() -> int:
            with ThreadPoolExecutor(1, "ceiling-tokenize") as pool:
                ahead = pool.submit(self.tokenize, batches[0])
                for i, batch in enumerate(batches):
                    tokens = ahead.result()
                    if i + 1 < len(batches):
                        ahead = pool.submit(self.tokenize, batches[i + 1])
                    self.finish(batch, tokens)
            return len(batches)

        return _measured(run, len(jobs), batch_size)


def _batches(items: Iterator[Prepared], size: int) -> Iterator[list[Prepared]]:
    while batch := list(islice(items, size)):
        yield batch


def _fastest_ms(call: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls, after a warm-up call (the fastest, not the median: the
    machine may be shared)."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


def _measured(run: Callable[[], int], items: int, batch_size: int) -> dict[str, Any]:
    """Time `run` (which returns the shards it wrote) over `items` items."""
    window = CpuWindow(time.process_time)
    cpu_start, start = time.process_time(), time.perf_counter()
    shards = run()
    seconds = time.perf_counter() - start
    return {"items": items, "seconds": seconds, "items_per_s": items / seconds,
            "batch_size": batch_size, "shards": shards, "rows_per_shard": items / shards,
            "cpu_s": time.process_time() - cpu_start, "cpu_window": window.close()}


def write_shard(store: LocalOutputStore, jobs: Sequence[Job], embeddings: np.ndarray, *,
                etags: Sequence[str | None], labels: Sequence[Any],
                truncated: Sequence[bool] | None = None, modality: str = "image") -> None:
    """The worker's shard layout: embeddings, row-aligned metadata, then the manifest."""
    model = jobs[0].model
    paths = ShardPaths(model, modality)
    shard = f"ceiling-{uuid.uuid4().hex[:12]}"
    buffer = io.BytesIO()
    np.save(buffer, embeddings.astype(np.float32), allow_pickle=False)
    store.put(paths.embeddings(shard), buffer.getvalue())
    table = pa.table({
        "row": pa.array(range(len(jobs)), pa.int32()),
        "job_id": [job.job_id for job in jobs],
        "source": [job.source for job in jobs],
        "etag": list(etags),
        "task": [job.task.value for job in jobs],
        "model": [model] * len(jobs),
        "labels": pa.array([[s.label for s in ls] if ls else [] for ls in labels],
                           pa.list_(pa.string())),
        "scores": pa.array([[s.score for s in ls] if ls else [] for ls in labels],
                           pa.list_(pa.float32())),
        "text_truncated": list(truncated or [False] * len(jobs)),
    })
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    store.put(paths.metadata(shard), buffer.getvalue())
    manifest = {"shard": shard, "model": model, "modality": modality, "rows": len(jobs),
                "dim": int(embeddings.shape[-1]), "jobs": [job.job_id for job in jobs],
                "created_at": time.time()}
    store.put(paths.manifest(shard), json.dumps(manifest).encode())


def _forward_batch1(ceiling: Ceiling | TextCeiling, config: CeilingConfig) -> dict[str, float]:
    found = {}
    for threads in sorted({config.torch_threads, *config.forward_threads}):
        torch.set_num_threads(threads)
        found[str(threads)] = ceiling.forward_ms(1)
    torch.set_num_threads(config.torch_threads)
    return found


def serve(config: CeilingConfig, answer: TextIO, commands: TextIO) -> None:
    """Measure what runs once, say so, then run the throughput loop on each `run` command.

    The forward pass at batch 1 and the single-item latency are measured twice, before the
    throughput runs and after them, and the better is kept (the machine may be shared)."""
    torch.set_num_threads(config.torch_threads)
    ceiling = TextCeiling(config) if config.modality == "text" else Ceiling(config)
    ceiling.warm()
    sizes = sorted(set(config.batch_sizes))
    forward = {str(size): ceiling.forward_ms(size, repeats=5 if size <= 8 else 2)
               for size in sorted({1, *sizes, config.worker_batch})}
    forward_batch1 = _forward_batch1(ceiling, config)
    latency = [ceiling.latency(config.latency_items)]
    sweep_jobs = ceiling.jobs[:config.sweep_items]
    sweep: dict[str, float] = {}
    for _ in range(config.repeats):  # best of `repeats`: the machine may be shared
        for size in sizes:
            found = ceiling.throughput(sweep_jobs, size)["items_per_s"]
            sweep[str(size)] = max(found, sweep.get(str(size), 0.0))
    best = max(sizes, key=lambda size: sweep[str(size)])
    _say(answer, {"sweep_items": len(sweep_jobs), "sweep_items_per_s": sweep,
                  "batch_size": best, "forward_ms": forward,
                  "torch_threads": torch.get_num_threads(),
                  "prepare_threads": config.prepare_threads})
    for command in commands:
        if command.strip() == "run":
            _say(answer, ceiling.throughput(ceiling.jobs, best))
        elif command.strip() == "quit":
            break
    again = _forward_batch1(ceiling, config)
    latency.append(ceiling.latency(config.latency_items))
    _say(answer, {
        "forward_batch1_ms_by_threads": {k: min(v, again[k]) for k, v in forward_batch1.items()},
        "forward_batch1_passes_ms": [forward_batch1, again],
        "latency_ms": min(latency, key=statistics.median), "latency_passes_ms": latency,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    })


def _say(answer: TextIO, message: dict[str, Any]) -> None:
    answer.write(json.dumps(message) + "\n")
    answer.flush()


def main(argv: list[str]) -> int:
    config = CeilingConfig(**json.loads(Path(argv[0]).read_text()))
    # Answers go to the real stdout; anything a library prints goes to stderr (the log).
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    serve(config, answer, sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
