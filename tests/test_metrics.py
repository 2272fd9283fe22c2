"""A real worker's Prometheus metrics and HTTP probes (worker/metrics.py)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer.client import Client
from schemas.jobs import Job, Task
from schemas.keys import queue_name
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.services import free_port
from tests.test_worker_e2e import upload_images

pytestmark = pytest.mark.timeout(300)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples}


def status_of(port: int, path: str) -> int:
    try:
        return int(urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_worker_counts_its_jobs_by_outcome_and_serves_its_probes(
        start_worker: Any, redis_url: str, s3_endpoint: str, s3: Any, bucket: str,
        tiny_model_dirs: dict[str, str]) -> None:
    model = tiny_model_dirs["openclip"]
    port = free_port()
    upload_images(s3, bucket, 3)
    s3.put_object(Bucket=bucket, Key="photos/notes.jpg", Body=b"<html>not an image</html>")
    start_worker(redis_url=redis_url, s3_endpoint_url=s3_endpoint, model=model,
                 output_uri=f"s3://{bucket}/embeddings", metrics_port=port,
                 health_interval_s=0.2)
    assert status_of(port, "/livez") == 200 and status_of(port, "/readyz") == 200
    assert status_of(port, "/nothing") == 404
    client = Client(Settings(redis_url=redis_url, model=model))
    jobs = [Job(task=Task.IMAGE_EMBEDDING, image=f"s3://{bucket}/photos/{name}", model=model)
            for name in ("img000.jpg", "img001.jpg", "img002.jpg", "notes.jpg", "gone.jpg")]
    results = client.wait(client.submit_many(jobs), timeout=120)
    assert [r.status for r in results] == [Status.DONE] * 3 + [Status.FAILED] * 2
    failed_codes = [r.error.code.value for r in results[3:] if r.error]

    # A job's record reads done at its shard's commit, a moment before its writer counts it.
    done = ("dualstream_jobs_total", (("code", ""), ("outcome", "done")))
    write = ("dualstream_stage_seconds_count", (("stage", "write"),))
    failed = [("dualstream_jobs_total", (("code", code), ("outcome", "failed")))
              for code in failed_codes]
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(port)
        settled = (samples.get(done) == 3 and samples.get(write) == 3
                   and all(samples.get(key, 0) >= 1 for key in failed))
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert samples[done] == 3
    for code in failed_codes:
        assert samples[("dualstream_jobs_total", (("code", code), ("outcome", "failed")))] >= 1
    assert samples[("dualstream_batch_items_count", (("modality", "image"),))] >= 1
    for stage in ("fetch", "decode", "forward", "write"):
        assert samples[("dualstream_stage_seconds_count", (("stage", stage),))] == 3
    assert samples[("dualstream_model_load_seconds", ())] > 0
    queue = (("queue", queue_name(model)),)
    assert samples[("dualstream_queue_jobs", (*queue, ("state", "queued")))] == 0
    assert samples[("dualstream_queue_live_consumers", queue)] == 1
    info = [labels for name, labels in samples if name == "dualstream_worker_info"]
    assert info and dict(info[0])["model"] == model
