"""Idempotency: the same job run twice, or at once on two workers, leaves one output row and
one result.

Every copy of a job has the same job id (a hash of its content). Before a row is written the
writer claims the job in Redis (control/results.py); a job already done is not written again,
and one claimed by a live writer is retried once the claim is released or its lease ends.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from control.objects import LocalOutputStore
from producer.client import Client
from schemas.jobs import Job, Task, pack_message
from schemas.keys import TASK_NAME, ShardPaths, queue_name
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.faults import (
    committed_rows,
    held_messages,
    launch_worker,
    wait_for,
    wait_until_ready,
    worker_launcher,
)
from tests.test_worker_e2e import upload_images

pytestmark = pytest.mark.timeout(300)
_ = worker_launcher  # a fixture

COPIES = 3


def test_copies_of_each_job_on_two_workers_at_once_then_again_leave_one_row_and_result(
        redis_url: str, s3_endpoint: str, s3: Any, bucket: str,
        tiny_model_dirs: dict[str, str], tmp_path: Path) -> None:
    model = tiny_model_dirs["openclip"]
    settings = {"redis_url": redis_url, "s3_endpoint_url": s3_endpoint, "model": model,
                "output_uri": f"s3://{bucket}/embeddings", "health_dir": str(tmp_path / "h"),
                "max_inflight_messages": 4, "max_batch_items": 8, "claim_lease_s": 5}
    upload_images(s3, bucket, 40)
    jobs = [Job(task=Task.IMAGE_EMBEDDING, image=f"s3://{bucket}/photos/img{i:03d}.jpg",
                model=model) for i in range(40)]
    client = Client(Settings(redis_url=redis_url, model=model))
    broker, queue = redis.Redis.from_url(redis_url), queue_name(model)
    workers = [launch_worker(tmp_path / f"w{i}.log", settings, wait_ready=False)
               for i in range(2)]
    try:
        for worker in workers:
            wait_until_ready(worker)
        # Copies side by side on the queue, one job per message, so the two workers take
        # copies of the same job at the same moment.
        for job in jobs:
            for _ in range(COPIES):
                client.submit_many([job], per_message=1, skip_done=False)
        ids = [job.job_id for job in jobs]
        assert all(r.status is Status.DONE for r in client.wait(ids, timeout=180))
        wait_for(lambda: broker.llen(queue) == 0 and held_messages(broker) == [], 120,
                 "every copy to be consumed")
        handled = [w.output().count("succeeded in") for w in workers]
        assert all(handled), f"both workers took messages: {handled}"

        # And once more, after they are done: forced past the client's done-check.
        client.submit_many(jobs, per_message=8, skip_done=False)
        wait_for(lambda: broker.llen(queue) == 0 and held_messages(broker) == [], 120,
                 "the second run to be consumed")
        assert sum(w.output().count("succeeded in") for w in workers) >= sum(handled) + 5
    finally:
        for worker in workers:
            worker.stop()

    rows = committed_rows(s3, bucket, f"embeddings/{ShardPaths(model, 'image').directory}/")
    assert Counter(rows) == Counter(ids), "one committed row per job"
    results = client.results.get_many(ids)
    assert len({r.job_id for r in results if r}) == len(ids)
    for result in results:
        assert result is not None and result.status is Status.DONE and result.output
        key = result.output.shard.removeprefix(f"s3://{bucket}/").removesuffix(".npy")
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{key}.json")["Body"].read())
        assert manifest["jobs"][result.output.row] == result.job_id, "the result's row is it"


def test_a_runs_counters_count_each_job_once_when_its_messages_arrive_twice(
        worker_launcher: Any, redis_url: str, tiny_model_dirs: dict[str, str],
        tmp_path: Path) -> None:
    """Every message of a run published twice (a redelivery, or a producer that re-sent
    after a lost reply): the run still counts each job once, and each has one row."""
    model = tiny_model_dirs["openclip"]
    output = tmp_path / "out"
    client = Client(Settings(redis_url=redis_url, model=model))
    jobs = [Job(task=Task.TEXT_EMBEDDING, text=f"twice {i}", model=model,
                return_embedding=False) for i in range(16)]
    ids = client.submit_many(jobs, per_message=4, run_id="run-twice")
    with client.app.producer_or_acquire() as producer:
        for start in range(0, len(jobs), 4):
            client.app.send_task(TASK_NAME, args=[pack_message(jobs[start:start + 4],
                                                               "run-twice")],
                                 queue=queue_name(model), producer=producer)
    broker = redis.Redis.from_url(redis_url)
    assert broker.llen(queue_name(model)) == 8
    worker_launcher({"redis_url": redis_url, "model": model, "output_uri": output.as_uri(),
                     "health_dir": str(tmp_path / "h"), "max_inflight_messages": 4,
                     "max_batch_items": 8})
    client.runs.listed("run-twice")
    client.wait_run("run-twice", timeout=120)
    wait_for(lambda: broker.llen(queue_name(model)) == 0 and held_messages(broker) == [], 60,
             "both copies of every message consumed")
    progress = client.run_progress("run-twice")
    assert (progress.queued, progress.done, progress.failed) == (16, 16, 0), progress
    rows = local_rows(output, model)
    assert Counter(rows) == Counter(ids), "one committed row per job"


def local_rows(output: Path, model: str) -> list[str]:
    """Job ids of every row in the committed text shards under a local output root."""
    store = LocalOutputStore(output.as_uri())
    return [job for key in store.list(ShardPaths(model, "text").directory)
            if key.endswith(".json")
            for job in json.loads(store.get(key) or b"{}")["jobs"]]
