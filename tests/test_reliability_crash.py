"""Crash recovery: a worker SIGKILLed mid-batch loses no job and duplicates no output row.

Every message a worker holds stays in its in-flight list in Redis until its task returns; a
killed worker stops its heartbeat, and a sweep (by any live worker) puts what it held back on
the queue within the heartbeat ttl (docs/reliability.md).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import Client
from schemas.jobs import Job, Task
from schemas.keys import ShardPaths, queue_name
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.faults import (
    committed_rows,
    held_messages,
    kill_tree,
    wait_for,
    worker_launcher,
)
from tests.test_worker_e2e import upload_images

pytestmark = pytest.mark.timeout(300)
_ = worker_launcher  # a fixture

VISIBILITY_TIMEOUT_S = 10


def broker_state(client: redis.Redis, queue: str) -> tuple[int, int]:
    """(messages waiting, messages held by consumers)."""
    return client.llen(queue), len(held_messages(client))


def test_sigkill_mid_batch_then_restart_completes_every_job_once(
        worker_launcher: Any, redis_url: str, s3_endpoint: str, s3: Any, bucket: str,
        tiny_model_dirs: dict[str, str], tmp_path: Path) -> None:
    model = tiny_model_dirs["openclip"]
    settings = {"redis_url": redis_url, "s3_endpoint_url": s3_endpoint, "model": model,
                "output_uri": f"s3://{bucket}/embeddings", "health_dir": str(tmp_path / "h"),
                "visibility_timeout_s": VISIBILITY_TIMEOUT_S,
                "claim_lease_s": VISIBILITY_TIMEOUT_S, "max_inflight_messages": 4,
                "max_batch_items": 8}
    upload_images(s3, bucket, 20)
    jobs = [Job(task=Task.IMAGE_EMBEDDING, image=f"s3://{bucket}/photos/img{i % 20:03d}.jpg",
                model=model, idempotency_key=f"copy-{i}") for i in range(240)]
    client = Client(Settings(redis_url=redis_url, model=model))
    ids = client.submit_many(jobs, per_message=4)
    broker, queue = redis.Redis.from_url(redis_url), queue_name(model)

    first = worker_launcher(settings)
    statuses = lambda: client.results.statuses(ids)  # noqa: E731
    wait_for(lambda: sum(s is Status.DONE for s in statuses()) >= 8
             and held_messages(broker), 120, "the first worker to be mid-run")
    killed = kill_tree(first.process.pid)
    first.process.wait(10)
    assert first.process.returncode == -9
    stranded = held_messages(broker)
    done_at_kill = sum(s is Status.DONE for s in statuses())
    assert stranded and done_at_kill < len(ids), "the kill must land mid-run"
    assert not any(_alive(pid) for pid in killed)

    worker_launcher(settings)
    results = client.wait(ids, timeout=180)
    assert [r.status for r in results] == [Status.DONE] * len(ids)

    rows = committed_rows(s3, bucket, f"embeddings/{ShardPaths(model, 'image').directory}/")
    assert Counter(rows) == Counter(set(ids)), "every job has exactly one committed row"
    wait_for(lambda: broker_state(broker, queue) == (0, 0), 60,
             "no message left waiting or unacknowledged")
    assert not broker.keys("ds:deliveries:*"), "every delivery record was closed"


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
