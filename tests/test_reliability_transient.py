"""Transient faults are retried with jittered backoff and lose nothing: S3 answering 503
SlowDown or resetting connections (a fault-injecting proxy in front of moto), and the Redis
server restarting in the middle of a run (a redis-server owned by the test, with AOF)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from control.objects import LocalOutputStore
from producer.client import Client
from schemas.jobs import Job, Task
from schemas.keys import ShardPaths, queue_name
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.faults import (
    SLOW_FORWARD_ENV,
    FaultProxy,
    committed_rows,
    held_messages,
    message_jobs,
    owned_redis,
    wait_for,
    worker_launcher,
)
from tests.fixtures.services import REPO, worker_env
from tests.test_worker_e2e import upload_images

pytestmark = pytest.mark.timeout(300)
_ = (worker_launcher, owned_redis)  # fixtures


def faulty_first_attempts(method: str, path: str, attempt: int) -> str | None:
    """Reads and writes alike: a quarter of them first get a 503 SlowDown, a quarter a TCP
    reset (after the request was read), and two images are refused on both of their first two
    attempts; every request goes through on the attempt after that."""
    if attempt < 2 and path.endswith(("img003.jpg", "img008.jpg")):
        return ("slowdown", "reset")[attempt]
    kind = zlib.crc32(f"{method} {path}".encode()) % 4
    if attempt == 0 and kind < 2:
        return ("slowdown", "reset")[kind]
    return None


def test_s3_slowdowns_and_connection_resets_are_retried_and_every_job_completes(
        worker_launcher: Any, redis_url: str, s3_endpoint: str, s3: Any, bucket: str,
        tiny_model_dirs: dict[str, str], tmp_path: Path) -> None:
    model = tiny_model_dirs["openclip"]
    upload_images(s3, bucket, 16)
    proxy = FaultProxy(upstream=s3_endpoint, plan=faulty_first_attempts).start()
    client = Client(Settings(redis_url=redis_url, model=model))
    ids = client.submit_many([Job(task=Task.IMAGE_EMBEDDING, model=model,
                                  image=f"s3://{bucket}/photos/img{i:03d}.jpg")
                              for i in range(16)], per_message=4)
    worker_launcher({"redis_url": redis_url, "s3_endpoint_url": proxy.url, "model": model,
                     "output_uri": f"s3://{bucket}/embeddings",
                     "health_dir": str(tmp_path / "h")})
    try:
        results = client.wait(ids, timeout=180)
    finally:
        proxy.stop()
    assert [r.status for r in results] == [Status.DONE] * len(ids)
    assert proxy.faults["slowdown"] >= 4 and proxy.faults["reset"] >= 4, proxy.faults
    reads = {path: n for (method, path), n in proxy.attempts.items() if "/photos/" in path}
    assert len(reads) == 16 and reads[f"/{bucket}/photos/img003.jpg"] == 3
    writes = [path for method, path in proxy.attempts if method == "PUT"]
    assert any(path.endswith(".json") for path in writes), "outputs went through the proxy"
    rows = committed_rows(s3, bucket, f"embeddings/{ShardPaths(model, 'image').directory}/")
    assert Counter(rows) == Counter(ids)


def wait_through_outages(client: Client, ids: list[str], timeout: float) -> list[Status | None]:
    """Poll the results, riding out the seconds when this test's Redis is down."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            statuses = client.results.statuses(ids)
            if all(s is Status.DONE for s in statuses) or time.monotonic() > deadline:
                return statuses
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def test_a_redis_restart_mid_run_loses_no_job(
        worker_launcher: Any, owned_redis: Any, tiny_model_dirs: dict[str, str],
        tmp_path: Path) -> None:
    server = owned_redis()
    model = tiny_model_dirs["openclip"]
    output = tmp_path / "out"
    client = Client(Settings(redis_url=server.url, model=model))
    ids = client.submit_many([Job(task=Task.TEXT_EMBEDDING, text=f"sentence number {i}",
                                  model=model) for i in range(400)], per_message=5)
    broker, queue = server.client(), queue_name(model)
    worker = worker_launcher({"redis_url": server.url, "model": model,
                              "output_uri": output.as_uri(), "health_dir": str(tmp_path / "h"),
                              "visibility_timeout_s": 10, "claim_lease_s": 10,
                              "max_inflight_messages": 4, "max_batch_items": 8,
                              "max_batch_wait_ms": 50},
                             faults={SLOW_FORWARD_ENV: "0.05"})
    wait_for(lambda: sum(s is Status.DONE for s in client.results.statuses(ids)) >= 40
             and len(held_messages(broker)) >= 3, 120, "the run to be under way")
    server.stop()  # SIGTERM: redis-server writes its AOF and exits
    time.sleep(3)
    server.start()
    done_after_restart = sum(s is Status.DONE for s in client.results.statuses(ids))
    assert done_after_restart < len(ids), "the restart must land mid-run"

    statuses = wait_through_outages(client, ids, timeout=180)
    assert Counter(statuses) == Counter({Status.DONE: len(ids)})
    assert worker.process.poll() is None, "the worker rode out the restart"
    store = LocalOutputStore(output.as_uri())
    directory = ShardPaths(model, "text").directory
    rows = [job for key in store.list(directory) if key.endswith(".json")
            for job in json.loads(store.get(key) or b"{}")["jobs"]]
    assert Counter(rows) == Counter(ids), "one committed row per job"
    wait_for(lambda: broker.llen(queue) == 0 and held_messages(broker) == [], 120,
             "no message waiting or unacknowledged")
    log = worker.output()
    assert "Connection to broker lost" in log or "Error while reading" in log


def test_the_clients_retry_with_jittered_exponential_backoff() -> None:
    """What the fault tests rely on, as configured: redis-py retries 6 times with full-jitter
    exponential backoff (50 ms base, 2 s cap); botocore's adaptive mode retries 8 times
    (rand × min(2^i × base, 20 s), and a client-side rate limit after throttling)."""
    import redis.backoff

    from control.connections import redis_client, s3_client

    retry = redis_client(Settings()).get_retry()
    assert retry is not None and retry._retries == 6
    assert isinstance(retry._backoff, redis.backoff.ExponentialWithJitterBackoff)
    delays = {round(retry._backoff.compute(3), 4) for _ in range(20)}
    assert len(delays) > 1 and max(delays) <= 0.4, "jittered, bounded by base × 2^3"
    config = s3_client(Settings(s3_endpoint_url="http://127.0.0.1:9")).meta.config.retries
    assert config == {"mode": "adaptive", "total_max_attempts": 9}


def test_a_bulk_run_rides_out_a_redis_restart(owned_redis: Any, tmp_path: Path) -> None:
    """The producer, like the worker, waits a restart out: the run finishes, exit status 0,
    every job enqueued (at least once: a publish whose reply was lost is sent again)."""
    server = owned_redis()
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6000):
        (folder / f"{i:05d}.jpg").write_bytes(b"")  # bulk lists files; it never reads them
    model = "some-org/some-model"
    bulk = subprocess.Popen(
        [sys.executable, "-m", "dualstream.cli", "bulk", str(folder), "--model", model,
         "--per-message", "1"], env=worker_env(redis_url=server.url), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    broker, queue = server.client(), queue_name(model)
    wait_for(lambda: broker.llen(queue) > 300, 60, "the bulk run to be under way")
    server.stop()
    assert bulk.poll() is None, "the restart must land mid-run"
    time.sleep(3)
    server.start()
    out, err = bulk.communicate(timeout=240)
    assert bulk.returncode == 0, err[-3000:]
    assert "6000 jobs listed" in out
    sources = set()
    for raw in server.client().lrange(queue, 0, -1):
        sources |= {job["image"] for job in message_jobs(raw)}
    assert len(sources) == 6000
    progress = Client(Settings(redis_url=server.url, model=model)).run_progress(
        out.split()[1].rstrip(":"))
    assert progress.listed and progress.queued >= 6000, progress
