"""The batching engine in-process: real Redis, a local output directory, a tiny real model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch

from control.objects import LocalOutputStore
from control.results import ResultStore
from schemas.errors import ErrorCode, TransientError
from schemas.jobs import Job, Task, ZeroShotOptions
from schemas.keys import RedisKeys
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.bad_images import bad_image_corpus
from tests.images import jpeg_bytes
from worker.embed import embed_images, embed_texts
from worker.forward import BatchForward
from worker.outputs import ShardWriter
from worker.pipeline import Pipeline
from worker.sources import SourceReader
from worker.zeroshot import LabelEmbeddingCache, score

FAMILY = "openclip"


@pytest.fixture
def encoder(tiny_encoders: dict[str, Any]) -> Any:
    return tiny_encoders[FAMILY]


@pytest.fixture
def make_pipeline(redis_url: str, tmp_path: Path, encoder: Any) -> Iterator[Any]:
    pipelines: list[Pipeline] = []

    def make(**overrides: Any) -> tuple[Pipeline, Settings]:
        settings = Settings(redis_url=redis_url, model=encoder.model_id,
                            output_uri=(tmp_path / "out").as_uri(),
                            local_root=str(tmp_path), **overrides)
        results = ResultStore(redis.Redis.from_url(redis_url), RedisKeys(), 3600)
        writer = ShardWriter(LocalOutputStore(settings.output_uri), results, worker="t",
                             lease_s=30)
        pipeline = Pipeline(settings, encoder, SourceReader(settings), writer, results)
        pipelines.append(pipeline)
        return pipeline, settings

    yield make
    for pipeline in pipelines:
        pipeline.close(5)


def image_job(path: Path, model: str, **fields: Any) -> Job:
    return Job(task=Task.IMAGE_EMBEDDING, image=str(path), model=model, **fields)


def write_images(folder: Path, count: int, start: int = 0) -> list[Path]:
    paths = []
    for i in range(start, start + count):
        path = folder / f"img{i:03d}.jpg"
        path.write_bytes(jpeg_bytes(i))
        paths.append(path)
    return paths


def test_jobs_from_many_submissions_are_batched_together(make_pipeline: Any,
                                                         tmp_path: Path) -> None:
    pipeline, settings = make_pipeline(max_batch_items=16, max_batch_wait_ms=200)
    paths = write_images(tmp_path, 64)
    futures = [pipeline.submit([image_job(p, settings.model)])[0] for p in paths]
    results = [f.result(timeout=120) for f in futures]
    assert all(r.status is Status.DONE for r in results)
    sizes = pipeline.stats.batch_sizes
    assert sum(sizes) == 64 and max(sizes) > 1 and max(sizes) <= 16
    assert pipeline.stats.forward_calls < 64


def test_embeddings_equal_the_encoders_direct_output(make_pipeline: Any, tmp_path: Path,
                                                     encoder: Any) -> None:
    pipeline, settings = make_pipeline()
    paths = write_images(tmp_path, 4)
    results = [f.result(60) for f in pipeline.submit([image_job(p, settings.model)
                                                      for p in paths])]
    direct = embed_images(encoder, [p.read_bytes() for p in paths]).numpy()
    np.testing.assert_allclose(np.array([r.embedding for r in results]), direct, atol=1e-5)
    texts = ["a photo of a cat", "一只猫的照片"]
    text_results = [f.result(60) for f in pipeline.submit(
        [Job(task=Task.TEXT_EMBEDDING, text=t, model=settings.model) for t in texts])]
    direct_text, _ = embed_texts(encoder, texts)
    np.testing.assert_allclose(np.array([r.embedding for r in text_results]),
                               direct_text.numpy(), atol=1e-5)


def test_zero_shot_labels_equal_a_direct_scoring(make_pipeline: Any, tmp_path: Path,
                                                 encoder: Any) -> None:
    pipeline, settings = make_pipeline()
    options = ZeroShotOptions(labels=["cat", "dog", "car", "tree"], top_k=4)
    paths = write_images(tmp_path, 3)
    jobs = [Job(task=Task.ZERO_SHOT, image=str(p), model=settings.model, zero_shot=options)
            for p in paths]
    results = [f.result(60) for f in pipeline.submit(jobs)]
    direct = score(encoder, embed_images(encoder, [p.read_bytes() for p in paths]), options,
                   LabelEmbeddingCache())
    for result, expected in zip(results, direct, strict=True):
        assert [s.label for s in result.labels or []] == [s.label for s in expected]
        np.testing.assert_allclose([s.score for s in result.labels or []],
                                   [s.score for s in expected], atol=1e-5)


def test_a_corrupt_image_fails_alone_and_its_batch_mates_complete(make_pipeline: Any,
                                                                 tmp_path: Path) -> None:
    pipeline, settings = make_pipeline(max_batch_items=8, max_batch_wait_ms=200)
    good = write_images(tmp_path, 5)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(jpeg_bytes(99)[:2000])
    missing = tmp_path / "missing.jpg"
    jobs = [image_job(p, settings.model) for p in [*good[:2], corrupt, missing, *good[2:]]]
    results = {r.source: r for r in (f.result(60) for f in pipeline.submit(jobs))}
    assert results[str(corrupt)].error.code is ErrorCode.TRUNCATED_IMAGE  # type: ignore[union-attr]
    assert results[str(missing)].error.code is ErrorCode.SOURCE_NOT_FOUND  # type: ignore[union-attr]
    assert all(results[str(p)].status is Status.DONE for p in good)


def test_every_bad_image_gets_its_code_and_the_good_ones_complete(make_pipeline: Any,
                                                                  tmp_path: Path) -> None:
    pipeline, settings = make_pipeline(max_batch_items=16)
    corpus = bad_image_corpus()
    bad_paths = []
    for i, (name, data, _) in enumerate(corpus):
        path = tmp_path / f"bad{i:02d}-{name}.jpg"
        path.write_bytes(data)
        bad_paths.append(path)
    good = write_images(tmp_path, 4)
    jobs = [image_job(p, settings.model) for p in [*bad_paths, *good]]
    results = [f.result(120) for f in pipeline.submit(jobs)]
    for (name, _, code), result in zip(corpus, results, strict=False):
        assert result.status is Status.FAILED, name
        assert result.error is not None and result.error.code == code, (name, result.error)
    assert all(r.status is Status.DONE for r in results[len(corpus):])


def test_files_outside_the_local_root_are_refused(make_pipeline: Any) -> None:
    pipeline, settings = make_pipeline()
    result = pipeline.submit([image_job(Path("/etc/passwd"), settings.model)])[0].result(30)
    assert result.error is not None and result.error.code is ErrorCode.SOURCE_NOT_ALLOWED


def test_over_long_text_is_truncated_and_says_so(make_pipeline: Any) -> None:
    pipeline, settings = make_pipeline()
    long_text = "word " * 2000
    result = pipeline.submit([Job(task=Task.TEXT_EMBEDDING, text=long_text,
                                  model=settings.model)])[0].result(60)
    assert result.status is Status.DONE and result.text_truncated


def test_a_done_job_submitted_again_gets_its_first_row(make_pipeline: Any,
                                                       tmp_path: Path) -> None:
    pipeline, settings = make_pipeline()
    job = image_job(write_images(tmp_path, 1)[0], settings.model)
    first = pipeline.submit([job])[0].result(60)
    second = pipeline.submit([job])[0].result(60)  # found done when its row is claimed
    assert second.output == first.output
    calls = pipeline.stats.forward_calls
    third = pipeline.submit([job], recheck=True)[0].result(60)  # a redelivery: before
    assert third.output == first.output and pipeline.stats.forward_calls == calls
    assert len(list((tmp_path / "out").rglob("*.json"))) == 1


@pytest.mark.parametrize(("error", "retried"), [
    (torch.OutOfMemoryError("CUDA out of memory"), True),
    (RuntimeError("a bug while scoring"), False),
])
def test_a_batch_that_fails_outside_the_forward_fails_its_jobs_not_the_pipeline(
    make_pipeline: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    error: Exception, retried: bool
) -> None:
    pipeline, settings = make_pipeline()
    first, second = write_images(tmp_path, 2)
    stack = BatchForward._stack
    calls = []

    def failing_once(self: BatchForward, items: list[Any]) -> torch.Tensor:
        calls.append(len(items))
        if len(calls) == 1:
            raise error
        return stack(self, items)

    monkeypatch.setattr(BatchForward, "_stack", failing_once)
    future = pipeline.submit([image_job(first, settings.model)])[0]
    if retried:
        with pytest.raises(TransientError):
            future.result(60)
    else:
        result = future.result(60)
        assert result.status is Status.FAILED and result.error is not None
        assert result.error.code is ErrorCode.INTERNAL
    assert pipeline.healthy
    assert pipeline.submit([image_job(second, settings.model)])[0].result(60).status \
        is Status.DONE
