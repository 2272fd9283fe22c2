"""Graceful drain: after SIGTERM the worker takes no new message, settles every held one
(finished with its outputs written and acknowledged, or requeued) and exits within the grace
period (`drain_timeout_s`).

The model stage is slowed inside the worker process (tests/fixtures/faults.py) so that the
signal lands while batches are held: briefly, so the held batches finish within the grace
period, or far longer than it, so they cannot and must be requeued.
"""

from __future__ import annotations

import signal
import subprocess
import time
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
    SLOW_FORWARD_ENV,
    committed_rows,
    held_messages,
    message_jobs,
    wait_for,
    worker_launcher,
)
from tests.test_worker_e2e import upload_images
from worker.health import probe

pytestmark = pytest.mark.timeout(300)
_ = worker_launcher  # a fixture

GRACE_S = 8.0
# The interpreter's exit and this test's polling, on top of the grace period: the margin that
# k8s/base/worker/deployment.yaml leaves for the exit (a loaded machine takes seconds).
EXIT_SLACK_S = 5.0


def queued_job_ids(broker: redis.Redis, queue: str) -> set[str]:
    """Job ids in the messages waiting on `queue`."""
    ids: set[str] = set()
    for raw in broker.lrange(queue, 0, -1):
        ids |= {Job.model_validate(job).job_id for job in message_jobs(raw)}
    return ids


@pytest.mark.parametrize(("forward_s", "held_batches"), [(0.5, "finish"), (60.0, "requeued")])
def test_sigterm_settles_held_batches_and_exits_within_the_grace_period(
        forward_s: float, held_batches: str, worker_launcher: Any, redis_url: str,
        s3_endpoint: str, s3: Any, bucket: str, tiny_model_dirs: dict[str, str],
        tmp_path: Path) -> None:
    model = tiny_model_dirs["openclip"]
    settings = {"redis_url": redis_url, "s3_endpoint_url": s3_endpoint, "model": model,
                "output_uri": f"s3://{bucket}/embeddings", "health_dir": str(tmp_path / "h"),
                "drain_timeout_s": GRACE_S, "visibility_timeout_s": 300, "health_interval_s": 0.5,
                "max_inflight_messages": 4, "max_batch_items": 8, "max_batch_wait_ms": 200}
    upload_images(s3, bucket, 8)
    jobs = [Job(task=Task.IMAGE_EMBEDDING, image=f"s3://{bucket}/photos/img{i % 8:03d}.jpg",
                model=model, idempotency_key=str(i)) for i in range(96)]
    client = Client(Settings(redis_url=redis_url, model=model))
    ids = client.submit_many(jobs, per_message=4)
    broker, queue = redis.Redis.from_url(redis_url), queue_name(model)

    worker = worker_launcher(settings, faults={SLOW_FORWARD_ENV: str(forward_s)})
    wait_for(lambda: len(held_messages(broker)) == 4 and "forward: slowed" in worker.output(),
             60, "held batches, one of them in its forward pass")
    held = {Job.model_validate(job).job_id
            for raw in held_messages(broker) for job in message_jobs(raw)}
    assert probe(tmp_path / "h", "ready", max_age_s=2)
    signalled = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    if held_batches == "requeued":  # the worker drains for seconds: is it unready meanwhile?
        wait_for(lambda: not probe(tmp_path / "h", "ready", max_age_s=2), 3, "not ready")
        assert worker.process.poll() is None, "not ready while it still drains"
    try:
        worker.process.wait(GRACE_S + EXIT_SLACK_S)
    except subprocess.TimeoutExpired:
        worker.process.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
        worker.process.wait(10)
    elapsed = time.monotonic() - signalled

    assert worker.process.returncode == 0, worker.output()[-3000:]
    assert elapsed <= GRACE_S + EXIT_SLACK_S, f"exited {elapsed:.1f} s after SIGTERM"
    assert held_messages(broker) == []
    statuses = dict(zip(ids, client.results.statuses(ids), strict=True))
    done = {job_id for job_id, status in statuses.items() if status is Status.DONE}
    waiting = queued_job_ids(broker, queue)
    assert set(ids) <= done | waiting, "every job is done or waits on the queue"
    rows = committed_rows(s3, bucket, f"embeddings/{ShardPaths(model, 'image').directory}/")
    assert done <= set(rows) and len(rows) == len(set(rows)), "done jobs have one row each"
    assert held <= done | waiting, "every held message was finished or requeued"
    if held_batches == "finish":
        assert held & done, "the batches in flight finished"
    else:
        assert held <= waiting, "the stuck batches were requeued"
        assert {statuses[job_id] for job_id in held} == {Status.QUEUED}, "and show queued"
        assert "requeued: the drain deadline came" in worker.output()
        assert not held & done
