"""Chaos: workers SIGKILLed at random every few seconds, S3 answering 503 at random, and a Redis
restart, over a bulk run; then every job is counted.

The short form runs in the test command (about a minute of chaos); the long form is the same
test with more jobs and time (docs/reliability.md has its figures):

    DS_CHAOS_JOBS=6000 DS_CHAOS_SECONDS=600 pytest tests/test_chaos.py -q -m slow

At the end: submitted, done, failed, lost (neither, once the run is over), duplicate rows, rows
for unknown jobs, orphaned shard files (written by a killed writer, never committed: allowed,
counted), results that differ from their rows. Lost, duplicates, unknown rows and differences
must be 0; every job must be done; the last job must finish within the recovery bound of the
last kill.
"""

from __future__ import annotations

import io
import json
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from producer.client import Client
from schemas.jobs import Job, Task
from schemas.keys import ShardPaths
from schemas.results import JobResult, Status
from schemas.settings import Settings
from tests.fixtures.faults import FaultProxy, kill_tree, launch_worker, owned_redis
from tests.test_reliability_transient import wait_through_outages
from tests.test_worker_e2e import upload_images

_ = owned_redis  # a fixture
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

JOBS = int(os.environ.get("DS_CHAOS_JOBS", "640"))
CHAOS_S = float(os.environ.get("DS_CHAOS_SECONDS", "45"))
WORKERS = 2
PER_MESSAGE = 32
TTL_S = 5  # heartbeat ttl = visibility timeout = claim lease here
# After the last kill: the sweep (ttl + one beat), a dead writer's claims (lease), a retry's
# backoff, a worker's start and the work left.
RECOVERY_MARGIN_S = 45
S3_FAULT_RATE = 0.05


def s3_faults(method: str, path: str, attempt: int) -> str | None:
    return "slowdown" if random.random() < S3_FAULT_RATE else None


class Chaos:
    """Keeps `WORKERS` workers running, SIGKILLs a random one every 2–5 s, restarts Redis once."""

    def __init__(self, settings: dict[str, object], logs: Path, redis_server: Any) -> None:
        self._settings = settings
        self._logs = logs
        self._redis = redis_server
        self.workers = [self._start(i) for i in range(WORKERS)]
        self.kills: list[float] = []
        self.redis_restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _start(self, n: int) -> Any:
        log = self._logs / f"worker-{n}-{time.monotonic_ns()}.log"
        return launch_worker(log, self._settings, wait_ready=False)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + CHAOS_S
        restart_at = time.monotonic() + CHAOS_S / 2
        while not self._stop.wait(random.uniform(2, 5)) and time.monotonic() < deadline:
            victim = random.randrange(WORKERS)
            kill_tree(self.workers[victim].process.pid)
            self.workers[victim].process.wait(10)
            self.kills.append(time.time())
            self.workers[victim] = self._start(victim)
            if self.redis_restarts == 0 and time.monotonic() > restart_at:
                self._redis.stop()
                time.sleep(2)
                self._redis.start()
                self.redis_restarts += 1

    def finish(self) -> None:
        self._thread.join()

    def stop_all(self) -> None:
        self._stop.set()
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait(10)


def committed(s3: Any, bucket: str, prefix: str) -> tuple[list[dict[str, Any]], int]:
    """(every committed row as {job_id, row, shard, labels}, shard files without a manifest)."""
    import pyarrow.parquet as pq

    listing = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = {o["Key"] for page in listing for o in page.get("Contents", [])}
    rows, committed_files = [], set()
    for key in sorted(k for k in keys if k.endswith(".json")):
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        directory = key.rsplit("/", 1)[0]
        parquet = f"{directory}/{manifest['metadata']}"
        table = pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=parquet)["Body"]
                                         .read())).to_pylist()
        committed_files |= {key, parquet, f"{directory}/{manifest['embeddings']}"}
        rows += [{"job_id": r["job_id"], "row": r["row"], "shard": manifest["embeddings"],
                  "labels": r["labels"]} for r in table]
    return rows, len(keys - committed_files)


def differs(result: JobResult, row: dict[str, Any]) -> bool:
    if result.output is None or not result.output.shard.endswith(row["shard"]):
        return True
    labels = [s.label for s in result.labels or []]
    return result.output.row != row["row"] or labels != row["labels"]


def test_chaos_kills_503s_and_a_redis_restart_lose_and_duplicate_nothing(
        owned_redis: Any, s3_endpoint: str, s3: Any, bucket: str,
        tiny_model_dirs: dict[str, str], tmp_path: Path) -> None:
    random.seed(int(os.environ.get("DS_CHAOS_SEED", str(time.time_ns()))))
    server = owned_redis()
    model = tiny_model_dirs["openclip"]
    upload_images(s3, bucket, 24)
    proxy = FaultProxy(upstream=s3_endpoint, plan=s3_faults).start()
    settings = {"redis_url": server.url, "s3_endpoint_url": proxy.url, "model": model,
                "output_uri": f"s3://{bucket}/embeddings", "health_dir": str(tmp_path / "h"),
                "visibility_timeout_s": TTL_S, "heartbeat_ttl_s": TTL_S,
                "claim_lease_s": TTL_S, "max_inflight_messages": 4, "max_batch_items": 32}
    client = Client(Settings(redis_url=server.url, model=model))
    labels = ["cat", "dog", "car"]
    jobs = [Job(task=Task.ZERO_SHOT, model=model, idempotency_key=f"chaos-{i}",
                image=f"s3://{bucket}/photos/img{i % 24:03d}.jpg",
                zero_shot={"labels": labels, "top_k": 3}, return_embedding=False)
            for i in range(JOBS)]
    ids = client.submit_many(jobs, per_message=PER_MESSAGE, run_id="run-chaos")
    chaos = Chaos(settings, tmp_path, server)
    try:
        chaos.start()
        chaos.finish()
        statuses = wait_through_outages(client, ids, timeout=300)
        results = client.wait(ids, timeout=60)
    finally:
        chaos.stop_all()
        proxy.stop()

    rows, orphaned = committed(s3, bucket, f"embeddings/{ShardPaths(model, 'image').directory}/")
    by_job = {row["job_id"]: row for row in rows}
    counts = Counter(row["job_id"] for row in rows)
    done = [r for r in results if r.status is Status.DONE]
    report = {
        "submitted": len(ids), "done": len(done),
        "failed": sum(r.status is Status.FAILED for r in results),
        "lost": sum(s not in (Status.DONE, Status.FAILED) for s in statuses),
        "duplicate_rows": sum(n - 1 for n in counts.values()),
        "unknown_rows": len(set(counts) - set(ids)), "orphaned_files": orphaned,
        "differences": sum(differs(r, by_job[r.job_id]) for r in done if r.job_id in by_job),
        "missing_rows": sum(r.job_id not in by_job for r in done),
        "kills": len(chaos.kills), "redis_restarts": chaos.redis_restarts,
        "s3_faults": dict(proxy.faults),
    }
    last_finish = max(r.timings.finished_at or 0 for r in done)
    report["last_job_after_last_kill_s"] = round(last_finish - max(chaos.kills), 1)
    print("chaos report:", json.dumps(report))
    assert report["kills"] >= CHAOS_S / 6 and report["redis_restarts"] == 1, report
    assert report["s3_faults"].get("slowdown", 0) > 0, report
    assert {k: report[k] for k in ("lost", "failed", "duplicate_rows", "unknown_rows",
                                    "differences", "missing_rows")} == dict.fromkeys(
        ("lost", "failed", "duplicate_rows", "unknown_rows", "differences", "missing_rows"), 0
    ), report
    assert report["done"] == len(ids), report
    assert report["last_job_after_last_kill_s"] <= TTL_S + RECOVERY_MARGIN_S, report
