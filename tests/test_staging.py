"""Staging (batch n+1 made ready on the device while batch n is forwarded) and what a worker
does when its device runs out of memory. The stage loops run on stubs; the failure cases run
the real pipeline with the tiny OpenCLIP model on the CPU, where the same code runs without
streams; the stream hand-over itself runs only on a CUDA device."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import redis
import torch
from PIL import Image

from control.objects import LocalOutputStore
from control.results import ResultStore
from schemas.errors import ErrorCode, TransientError
from schemas.jobs import Job, Task
from schemas.keys import RedisKeys
from schemas.results import Status
from schemas.settings import Settings
from tests.images import jpeg_bytes
from worker.device_stream import DeviceStager, StagedPixels
from worker.model_stage import ModelStage
from worker.outputs import ShardWriter
from worker.pipeline import Pipeline
from worker.sources import SourceReader
from worker.staging_stage import STAGED_BATCHES, PipelineStats, StagedBatch, StagingStage

# --- the two stage loops, on a stub forward -------------------------------------------------


class StubForward:
    """Stages and forwards batches of fake items, recording when each step happens."""

    def __init__(self, forward_gate: threading.Event | None = None,
                 batches: int | None = None) -> None:
        self.staged: list[list[int]] = []
        self.forwarded: list[list[int]] = []
        self.forward_gate = forward_gate
        self.batches = batches  # when given, a forward pass waits for staging to move on
        self.stalled_forwards = 0

    def stage_images(self, items: list[Any]) -> StagedPixels | None:
        self.staged.append([item.n for item in items])
        time.sleep(0.002 * (items[0].n % 3))  # uneven staging times
        return StagedPixels(torch.zeros(len(items), 1))

    def stage_texts(self, items: list[Any]) -> None:
        return None

    def images(self, items: list[Any], staged: StagedPixels) -> None:
        before = len(self.staged)
        if self.forward_gate is not None:
            self.forward_gate.wait(30)
        time.sleep(0.01)
        if self.batches is not None:
            # Whether staging goes on during a forward pass, not how fast (a loaded machine may
            # not run the staging thread within any fixed time): it must stage another batch
            # unless it is already as far ahead as the staged queue lets it be (the queue full
            # and one more batch staged) or has nothing left.
            ahead = min(self.batches, len(self.forwarded) + 1 + STAGED_BATCHES + 1)
            deadline = time.monotonic() + 10
            while len(self.staged) == before < ahead and time.monotonic() < deadline:
                time.sleep(0.001)
            self.stalled_forwards += len(self.staged) == before < ahead
        self.forwarded.append([item.n for item in items])


def fake_item(n: int) -> Any:
    return SimpleNamespace(n=n, pixels=torch.zeros(1), jpeg=None)


@pytest.fixture
def stages() -> Iterator[Callable[..., tuple[StubForward, queue.Queue[Any],
                                              queue.Queue[StagedBatch]]]]:
    stopping = threading.Event()
    threads: list[threading.Thread] = []

    def start(forward: StubForward, items: int, batch: int = 2):  # type: ignore[no-untyped-def]
        settings = Settings(model="tiny/model", max_batch_items=batch, max_batch_wait_ms=0)
        ready: queue.Queue[Any] = queue.Queue()
        for n in range(items):
            ready.put(fake_item(n))
        staged: queue.Queue[StagedBatch] = queue.Queue(maxsize=STAGED_BATCHES)
        stats = PipelineStats()
        unused: Any = None
        preparing: Any = SimpleNamespace(more_coming=lambda: False)
        staging = StagingStage(settings, unused, preparing, ready, staged, unused, stats)
        staging._forward = forward  # type: ignore[assignment]
        model = ModelStage(forward, staged, queue.Queue(), unused, stats)  # type: ignore[arg-type]
        for run in (staging.run, model.run):
            threads.append(threading.Thread(target=run, args=(stopping,), daemon=True))
            threads[-1].start()
        return forward, ready, staged

    yield start
    stopping.set()
    for thread in threads:
        thread.join(5)


def wait_for(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_staged_batches_are_forwarded_in_the_order_they_were_collected(stages: Any) -> None:
    forward, _, _ = stages(StubForward(), items=40)
    wait_for(lambda: sum(map(len, forward.forwarded)) == 40)
    assert forward.forwarded == forward.staged
    assert [n for batch in forward.forwarded for n in batch] == list(range(40))


def test_the_next_batch_is_staged_while_one_is_forwarded(stages: Any) -> None:
    forward, _, _ = stages(StubForward(batches=10), items=20)
    wait_for(lambda: len(forward.forwarded) == 10, timeout=120)
    assert forward.stalled_forwards == 0  # staging did not wait for the forward passes


def test_staging_stops_when_the_model_falls_behind(stages: Any) -> None:
    gate = threading.Event()
    forward, ready, staged = stages(StubForward(gate), items=40)
    # One batch in the forward pass, the queue full, one staged batch waiting to be queued.
    wait_for(lambda: staged.full() and len(forward.staged) == STAGED_BATCHES + 2)
    time.sleep(0.3)
    assert len(forward.staged) == STAGED_BATCHES + 2 and forward.forwarded == []
    assert ready.qsize() == 40 - 2 * (STAGED_BATCHES + 2)
    gate.set()
    wait_for(lambda: sum(map(len, forward.forwarded)) == 40)


# --- the real pipeline: failures in staging and out of device memory ------------------------


class OutOfMemoryAbove:
    """The tiny encoder, but its forward passes run out of device memory above `limit` items
    (torch.cuda.OutOfMemoryError, which a CPU build of torch raises too)."""

    def __init__(self, encoder: Any, limit: int) -> None:
        self._encoder = encoder
        self._limit = limit
        self.sizes: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def _check(self, size: int) -> None:
        self.sizes.append(size)
        if size > self._limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (a batch of {size})")

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self._check(len(pixels))
        return self._encoder.encode_images(pixels)

    def encode_texts(self, texts: Any) -> torch.Tensor:
        self._check(len(texts))
        return self._encoder.encode_texts(texts)


def halvings(batch: int, limit: int) -> list[int]:
    """The forward passes a batch takes when passes above `limit` items run out of memory:
    itself, then each half in turn, down to single items."""
    if batch <= limit or batch == 1:
        return [batch]
    return [batch, *halvings(batch // 2, limit), *halvings(batch - batch // 2, limit)]


def passes(batch_sizes: list[int], limit: int) -> list[int]:
    """What the forward passes should be, batch after batch as the staging stage collected
    them (how jobs fall into batches depends on when the preparation threads ran)."""
    return [size for batch in batch_sizes for size in halvings(batch, limit)]


@pytest.fixture
def run_jobs(redis_url: str, tmp_path: Path) -> Callable[..., tuple[list[Any], Pipeline]]:
    def run(encoder: Any, jobs: list[Job], **overrides: Any) -> tuple[list[Any], Pipeline]:
        settings = Settings(redis_url=redis_url, model=encoder.model_id,
                            output_uri=(tmp_path / "out").as_uri(), local_root=str(tmp_path),
                            max_batch_items=16, max_batch_wait_ms=2000, **overrides)
        results = ResultStore(redis.Redis.from_url(redis_url), RedisKeys(), 3600)
        writer = ShardWriter(LocalOutputStore(settings.output_uri), results, worker="t",
                             lease_s=30)
        pipeline = Pipeline(settings, encoder, SourceReader(settings), writer, results)
        try:
            futures = pipeline.submit(jobs)
            outcomes = []
            for future in futures:
                try:
                    outcomes.append(future.result(120))
                except TransientError as exc:
                    outcomes.append(exc)
            return outcomes, pipeline
        finally:
            pipeline.close(5)

    return run


def image_jobs(folder: Path, count: int, model: str, tag: str = "") -> list[Job]:
    jobs = []
    for i in range(count):
        path = folder / f"{tag}img{i:02d}.jpg"
        path.write_bytes(jpeg_bytes(i))
        jobs.append(Job(task=Task.IMAGE_EMBEDDING, image=str(path), model=model,
                        return_embedding=True, idempotency_key=f"{folder.name}-{tag}{i}"))
    return jobs


def test_an_item_that_cannot_be_staged_fails_alone(
    run_jobs: Any, tmp_path: Path, tiny_encoders: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = tiny_encoders["openclip"]
    jobs = image_jobs(tmp_path, 8, encoder.model_id)
    odd = (tmp_path / "odd.jpg")
    odd.write_bytes(jpeg_bytes(99, size=(33, 17)))
    jobs.insert(3, Job(task=Task.IMAGE_EMBEDDING, image=str(odd), model=encoder.model_id))
    preprocess = encoder.preprocess_image

    def wrong_shape_for_the_odd_one(image: Any) -> torch.Tensor:
        pixels = preprocess(image)
        return pixels[:, :8, :8] if image.size == (33, 17) else pixels

    monkeypatch.setattr(encoder, "preprocess_image", wrong_shape_for_the_odd_one)
    outcomes, pipeline = run_jobs(encoder, jobs)
    assert max(pipeline.stats.batch_sizes) > 1  # the odd one was staged with batch-mates
    assert [r.status for r in outcomes] == [Status.DONE] * 3 + [Status.FAILED] + \
        [Status.DONE] * 5
    assert outcomes[3].error.code is ErrorCode.INTERNAL
    assert "shape" in outcomes[3].error.message


def test_out_of_device_memory_splits_the_batch_in_halves_and_loses_nothing(
    run_jobs: Any, tmp_path: Path, tiny_encoders: dict[str, Any]
) -> None:
    encoder = OutOfMemoryAbove(tiny_encoders["openclip"], limit=2)
    jobs = image_jobs(tmp_path, 8, encoder.model_id)
    outcomes, pipeline = run_jobs(encoder, jobs)
    assert [r.status for r in outcomes] == [Status.DONE] * 8
    assert halvings(8, 2) == [8, 4, 2, 2, 4, 2, 2]
    assert sum(pipeline.stats.batch_sizes) == 8 and max(pipeline.stats.batch_sizes) > 2
    assert encoder.sizes == passes(pipeline.stats.batch_sizes, 2)
    rows = [encoder.preprocess_image(Image.open(job.image or "").convert("RGB")) for job in jobs]
    expected = tiny_encoders["openclip"].encode_images(torch.stack(rows)).numpy()
    found = np.array([r.embedding for r in outcomes])
    assert np.abs(found - expected).max() < 1e-5  # each row stayed with its job


def test_texts_out_of_device_memory_split_too_and_keep_their_truncation_flags(
    run_jobs: Any, tmp_path: Path, tiny_encoders: dict[str, Any]
) -> None:
    encoder = OutOfMemoryAbove(tiny_encoders["openclip"], limit=1)
    texts = ["a cat", "word " * 500, "a dog", "a car"]
    jobs = [Job(task=Task.TEXT_EMBEDDING, text=text, model=encoder.model_id,
                idempotency_key=f"{tmp_path.name}-{i}") for i, text in enumerate(texts)]
    outcomes, pipeline = run_jobs(encoder, jobs)
    assert [r.status for r in outcomes] == [Status.DONE] * 4
    assert [r.text_truncated for r in outcomes] == [False, True, False, False]
    assert sum(pipeline.stats.batch_sizes) == 4 and max(pipeline.stats.batch_sizes) > 1
    assert encoder.sizes == passes(pipeline.stats.batch_sizes, 1)


def test_one_item_that_still_runs_out_of_device_memory_is_retried_with_a_clear_error(
    run_jobs: Any, tmp_path: Path, tiny_encoders: dict[str, Any]
) -> None:
    encoder = OutOfMemoryAbove(tiny_encoders["openclip"], limit=0)
    outcomes, pipeline = run_jobs(encoder, image_jobs(tmp_path, 4, encoder.model_id))
    assert all(isinstance(o, TransientError) for o in outcomes)  # retried, then dead-lettered
    assert {o.code for o in outcomes} == {ErrorCode.INTERNAL}
    assert all("out of device memory for a single item" in o.message for o in outcomes)
    assert sorted(encoder.sizes) == sorted(passes(pipeline.stats.batch_sizes, 0))
    assert sum(pipeline.stats.batch_sizes) == 4


# --- on a CUDA device: the staging stream ---------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_on_a_gpu_a_staged_batch_is_safe_to_use_on_the_model_stream() -> None:
    device = torch.device("cuda")
    stager = DeviceStager(device, torch.float16, torch.channels_last)
    batches = [torch.rand(64, 3, 224, 224) for _ in range(4)]
    staged = [stager.stage(batch) for batch in batches]  # queued on the staging stream
    for batch, one in zip(batches, staged, strict=True):
        pixels = stager.hand_over(one)
        assert pixels.dtype == torch.float16 and pixels.is_contiguous(
            memory_format=torch.channels_last)
        assert torch.equal(pixels.float().cpu(), batch.half().float())


@cuda
def test_on_a_gpu_the_staged_pipeline_matches_the_cpu(
    run_jobs: Any, tmp_path: Path, tiny_model_dirs: dict[str, str],
    tiny_encoders: dict[str, Any]
) -> None:
    from worker.models.loader import load_encoder

    gpu = load_encoder(tiny_model_dirs["openclip"], device="cuda", dtype="fp32")
    on_gpu, _ = run_jobs(gpu, image_jobs(tmp_path, 24, gpu.model_id, "g"), max_batch_items=4)
    on_cpu, _ = run_jobs(tiny_encoders["openclip"], image_jobs(tmp_path, 24, gpu.model_id, "c"))
    found = np.array([r.embedding for r in on_gpu])
    expected = np.array([r.embedding for r in on_cpu])
    assert (found * expected).sum(axis=1).min() > 0.9999
