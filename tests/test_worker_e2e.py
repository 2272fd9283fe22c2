"""End to end: producer → Redis → a real `dualstream worker` process → S3 (moto over HTTP)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import redis

from producer.bulk import BulkRequest, jobs_for, list_sources
from producer.client import Client
from schemas.errors import ErrorCode
from schemas.jobs import Job, Task, ZeroShotOptions
from schemas.keys import ShardPaths, queue_name
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.services import REPO, worker_env
from tests.images import jpeg_bytes
from worker.embed import embed_images

pytestmark = pytest.mark.timeout(600)
FAMILY = "openclip"
LABELS = ["cat", "dog", "car", "tree"]


@pytest.fixture
def model(tiny_model_dirs: dict[str, str]) -> str:
    return tiny_model_dirs[FAMILY]


@pytest.fixture
def settings(redis_url: str, s3_endpoint: str, bucket: str, model: str) -> Settings:
    return Settings(redis_url=redis_url, s3_endpoint_url=s3_endpoint, model=model,
                    output_uri=f"s3://{bucket}/embeddings")


def upload_images(s3: Any, bucket: str, count: int, prefix: str = "photos/") -> dict[str, bytes]:
    images = {}
    for i in range(count):
        key = f"{prefix}img{i:03d}.jpg"
        images[key] = jpeg_bytes(i)
        s3.put_object(Bucket=bucket, Key=key, Body=images[key])
    return images


def committed_manifests(s3: Any, bucket: str, model: str) -> list[dict[str, Any]]:
    prefix = f"embeddings/{ShardPaths(model, 'image').directory}/"
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return [json.loads(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
            for o in listing if o["Key"].endswith(".json")]


def run_worker(start_worker: Any, settings: Settings, **extra: object) -> Any:
    return start_worker(redis_url=settings.redis_dsn, s3_endpoint_url=settings.s3_endpoint_url,
                        model=settings.model, output_uri=settings.output_uri, **extra)


def test_bulk_over_a_bucket_labels_every_image_and_stores_exact_embeddings(
        start_worker: Any, settings: Settings, s3: Any, bucket: str, tiny_encoders: Any) -> None:
    images = upload_images(s3, bucket, 12)
    s3.put_object(Bucket=bucket, Key="photos/notes.txt", Body=b"not an image")
    worker = run_worker(start_worker, settings)
    cli = subprocess.run(
        [sys.executable, "-m", "dualstream.cli", "bulk", f"s3://{bucket}/photos/",
         "--labels", ",".join(LABELS), "--per-message", "5", "--wait"],
        env=worker_env(redis_url=settings.redis_dsn, s3_endpoint_url=settings.s3_endpoint_url,
                       model=settings.model),
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    run_id = cli.stdout.split()[1].rstrip(":")
    summary = json.loads(cli.stdout.strip().splitlines()[-1])
    assert summary == {"run": run_id, "queued": 12, "done": 12, "failed": 0,
                       "failed_by_code": {}, "listed": True, "finished": True}
    client = Client(settings)
    request = BulkRequest(source=f"s3://{bucket}/photos/", model=settings.model,
                          zero_shot=ZeroShotOptions(labels=LABELS))
    assert request.run_id == run_id
    from control.connections import s3_client

    jobs = list(jobs_for(request, list_sources(request.source, request.suffixes,
                                               s3_client(settings))))
    ids = [job.job_id for job in jobs]
    assert len(ids) == 12  # the .txt key is filtered out by suffix
    source_of = {job.job_id: job.source for job in jobs}
    results = client.wait(ids, timeout=60)
    assert all(r.status is Status.DONE for r in results)
    assert all(r.labels and {s.label for s in r.labels} <= set(LABELS) for r in results)

    direct = embed_images(tiny_encoders[FAMILY], list(images.values())).numpy()
    by_source = {f"s3://{bucket}/{key}": row for key, row in zip(images, direct, strict=True)}
    stored = 0
    for manifest in committed_manifests(s3, bucket, settings.model):
        key = f"embeddings/{ShardPaths(settings.model, 'image').directory}/{manifest['embeddings']}"
        array = np.load(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))
        for row, job_id in enumerate(manifest["jobs"]):
            source = source_of[job_id]
            np.testing.assert_allclose(array[row], by_source[source], atol=1e-5)
            stored += 1
    assert stored == 12
    assert "DuplicateTaskNameWarning" not in worker.output()


def test_the_worker_batches_across_messages(start_worker: Any, settings: Settings, s3: Any,
                                            bucket: str) -> None:
    upload_images(s3, bucket, 64)
    client = Client(settings)
    request = BulkRequest(source=f"s3://{bucket}/photos/", model=settings.model)
    from control.connections import s3_client

    sources = list_sources(request.source, request.suffixes, s3_client(settings))
    ids = client.submit_many(jobs_for(request, sources), per_message=1)  # 64 messages
    assert redis.Redis.from_url(settings.redis_dsn).llen(queue_name(settings.model)) == 64
    run_worker(start_worker, settings, max_batch_items=16, max_batch_wait_ms=500,
               max_inflight_messages=32)
    assert all(r.status is Status.DONE for r in client.wait(ids, timeout=300))
    rows_per_shard = [m["rows"] for m in committed_manifests(s3, bucket, settings.model)]
    assert sum(rows_per_shard) == 64
    assert max(rows_per_shard) > 1 and max(rows_per_shard) <= 16


def test_the_same_input_twice_gives_one_job_id_and_one_row(start_worker: Any,
                                                           settings: Settings, s3: Any,
                                                           bucket: str) -> None:
    upload_images(s3, bucket, 1)
    client = Client(settings)
    job = Job(task=Task.ZERO_SHOT, image=f"s3://{bucket}/photos/img000.jpg", model=settings.model,
              zero_shot=ZeroShotOptions(labels=LABELS))
    # Sent twice before any worker runs, so both messages are on the queue at once.
    first = client.submit(job)
    client.app.send_task("dualstream.process", args=[{"jobs": [job.model_dump(mode="json")]}],
                         queue=queue_name(settings.model))
    run_worker(start_worker, settings)
    assert client.result(first, timeout=120).status is Status.DONE
    second = client.submit(job)
    assert second == first
    assert client.result(second, timeout=60).status is Status.DONE
    rows = [j for m in committed_manifests(s3, bucket, settings.model) for j in m["jobs"]]
    assert rows == [first]


def test_bad_sources_fail_alone_with_their_codes(start_worker: Any, settings: Settings, s3: Any,
                                                 bucket: str) -> None:
    upload_images(s3, bucket, 3)
    s3.put_object(Bucket=bucket, Key="photos/corrupt.jpg", Body=jpeg_bytes(7)[:1500])
    client = Client(settings)
    sources = {
        "good0": f"s3://{bucket}/photos/img000.jpg",
        "corrupt": f"s3://{bucket}/photos/corrupt.jpg",
        "missing": f"s3://{bucket}/photos/nope.jpg",
        "no_bucket": "s3://no-such-bucket-dualstream/x.jpg",
        "good1": f"s3://{bucket}/photos/img001.jpg",
        "http": "http://169.254.169.254/latest/meta-data",
        "good2": f"s3://{bucket}/photos/img002.jpg",
    }
    jobs = [Job(task=Task.IMAGE_EMBEDDING, image=s, model=settings.model)
            for s in sources.values()]
    ids = client.submit_many(jobs, per_message=len(jobs))
    run_worker(start_worker, settings)
    results = dict(zip(sources, client.wait(ids, timeout=120), strict=True))
    assert all(results[name].status is Status.DONE for name in ("good0", "good1", "good2"))
    expected = {"corrupt": ErrorCode.TRUNCATED_IMAGE, "missing": ErrorCode.SOURCE_NOT_FOUND,
                "no_bucket": ErrorCode.SOURCE_NOT_FOUND, "http": ErrorCode.SOURCE_NOT_ALLOWED}
    for name, code in expected.items():
        assert results[name].error is not None and results[name].error.code is code, name


def test_the_plain_celery_command_runs_the_same_worker(start_worker: Any, settings: Settings,
                                                       s3: Any, bucket: str) -> None:
    upload_images(s3, bucket, 2)
    client = Client(settings)
    ids = [client.embed_image(f"s3://{bucket}/photos/img00{i}.jpg") for i in range(2)]
    celery = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
              "-Q", queue_name(settings.model), "--loglevel", "INFO"]
    run_worker(start_worker, settings, argv=celery)
    assert all(r.status is Status.DONE for r in client.wait(ids, timeout=120))
