"""Bounded memory: with 100,000 jobs queued, a worker holds no more than its prefetch bound
(`max_inflight_messages` unacknowledged messages) and its resident memory does not grow with
the backlog. The backlog stays in Redis, where the autoscaler sees it."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from producer.client import Client
from schemas.jobs import Job, JobMessage, Task
from schemas.keys import queue_name
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.faults import celery_message, held_messages, wait_for, worker_launcher

pytestmark = pytest.mark.timeout(300)
_ = worker_launcher  # a fixture

BACKLOG = 100_000
INFLIGHT = 16
GROWTH_LIMIT_MB = 64


def enqueue(broker: redis.Redis, queue: str, model: str, count: int) -> None:
    """`count` one-job messages, pushed in pipelines (as a fast producer would)."""
    pipe = broker.pipeline(transaction=False)
    for i in range(count):
        job = Job(task=Task.TEXT_EMBEDDING, text=f"backlog sentence {i}", model=model)
        payload = JobMessage(jobs=[job]).model_dump(mode="json")
        pipe.lpush(queue, celery_message([payload], queue=queue, message_id=str(uuid.uuid4())))
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def test_a_100000_job_backlog_stays_in_redis_and_worker_memory_stays_bounded(
        worker_launcher: Any, redis_url: str, tiny_model_dirs: dict[str, str],
        tmp_path: Path) -> None:
    model = tiny_model_dirs["openclip"]
    broker, queue = redis.Redis.from_url(redis_url), queue_name(model)
    worker = worker_launcher({"redis_url": redis_url, "model": model,
                              "output_uri": (tmp_path / "out").as_uri(),
                              "health_dir": str(tmp_path / "h"),
                              "max_inflight_messages": INFLIGHT})
    # Warm up on the same kind of work, so that what follows measures the backlog alone.
    client = Client(Settings(redis_url=redis_url, model=model))
    warm = client.submit_many([Job(task=Task.TEXT_EMBEDDING, text=f"warm-up {i}", model=model)
                               for i in range(500)], per_message=1)
    assert all(r.status is Status.DONE for r in client.wait(warm, timeout=120))
    baseline = rss_mb(worker.process.pid)

    redis_before = int(broker.info("memory")["used_memory"])
    enqueue(broker, queue, model, BACKLOG)
    backlog_mb = (int(broker.info("memory")["used_memory"]) - redis_before) / 2**20
    consumed_from = broker.llen(queue)
    rss, held = [], []
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        rss.append(rss_mb(worker.process.pid))
        held.append(len(held_messages(broker)))
        time.sleep(0.2)
    wait_for(lambda: broker.llen(queue) < consumed_from - 500, 60, "the worker to consume")

    assert worker.process.poll() is None
    assert max(held) <= INFLIGHT, f"at most {INFLIGHT} messages held, saw {max(held)}"
    assert broker.llen(queue) > BACKLOG * 0.8, "the backlog waits in Redis"
    growth = max(rss) - baseline
    report = (f"RSS baseline {baseline:.0f} MB, max {max(rss):.0f} MB (+{growth:.1f} MB) "
              f"while {BACKLOG} jobs ({backlog_mb:.0f} MB in Redis) were queued")
    print(report)
    assert growth < GROWTH_LIMIT_MB, report
    assert growth < backlog_mb / 2, report
