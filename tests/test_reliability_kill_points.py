"""A worker SIGKILLed at each point of a message's life loses no job and duplicates no row.

The points (tests/fixtures/faults.py `KILL_POINTS`): right after the fetch (the pop and the
record of the message as held are one command, `BLMOVE`, so there is no instant between them),
mid-batch (before the forward pass), during the write (data written, manifest not yet), right
after the commit (manifest written, results not yet), and on either side of the ack. A second
worker then finishes every job exactly once, nothing is left waiting, held or counted, and the
run's counters say exactly how many jobs were done.
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
from schemas.jobs import Job, Task
from schemas.keys import ShardPaths, queue_name
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.faults import (
    KILL_AT_ENV,
    KILL_POINTS,
    held_messages,
    wait_for,
    worker_launcher,
)

pytestmark = pytest.mark.timeout(300)
_ = worker_launcher  # a fixture

JOBS, PER_MESSAGE = 24, 4
HEARTBEAT_TTL_S = 3


def committed_rows(output: Path, model: str) -> dict[str, tuple[str, int]]:
    """job id → (shard file, row) over every committed shard; fails on a duplicate row."""
    store = LocalOutputStore(output.as_uri())
    rows: list[tuple[str, str, int]] = []
    for key in store.list(ShardPaths(model, "text").directory):
        if key.endswith(".json"):
            manifest = json.loads(store.get(key) or b"{}")
            rows += [(job, manifest["embeddings"], i) for i, job in enumerate(manifest["jobs"])]
    counts = Counter(job for job, _, _ in rows)
    assert max(counts.values(), default=1) == 1, f"duplicate rows: {counts.most_common(3)}"
    return {job: (shard, row) for job, shard, row in rows}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_worker_killed_at_any_point_of_a_message_leaves_every_job_done_once(
        point: str, worker_launcher: Any, redis_url: str, tiny_model_dirs: dict[str, str],
        tmp_path: Path) -> None:
    model = tiny_model_dirs["openclip"]
    output = tmp_path / "out"
    settings = {"redis_url": redis_url, "model": model, "output_uri": output.as_uri(),
                "health_dir": str(tmp_path / "h"), "heartbeat_ttl_s": HEARTBEAT_TTL_S,
                "claim_lease_s": HEARTBEAT_TTL_S, "max_inflight_messages": 2,
                "max_batch_items": PER_MESSAGE}
    client = Client(Settings(redis_url=redis_url, model=model))
    ids = client.submit_many([Job(task=Task.TEXT_EMBEDDING, text=f"sentence {i}", model=model)
                              for i in range(JOBS)], per_message=PER_MESSAGE, run_id="run-kill")
    broker = redis.Redis.from_url(redis_url)

    doomed = worker_launcher(settings, faults={KILL_AT_ENV: point}, wait_ready=False)
    assert doomed.process.wait(120) == -9, doomed.output()[-3000:]
    worker_launcher(settings)

    results = client.wait(ids, timeout=120)
    assert [r.status for r in results] == [Status.DONE] * JOBS
    rows = committed_rows(output, model)
    assert set(rows) == set(ids), "every job has exactly one committed row"
    for result in results:
        assert result.output is not None
        shard, row = rows[result.job_id]
        assert result.output.shard.endswith(shard) and result.output.row == row
    wait_for(lambda: broker.llen(queue_name(model)) == 0 and held_messages(broker) == [], 30,
             "nothing waiting or held")
    assert not broker.keys("ds:deliveries:*"), "the lost deliveries were closed once finished"
    progress = client.run_progress("run-kill")
    assert (progress.queued, progress.done, progress.failed) == (JOBS, JOBS, 0), progress
