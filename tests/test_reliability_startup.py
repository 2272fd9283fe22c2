"""A worker that cannot serve its model stops at once with a failing exit status, before it
takes a message (Kubernetes then reports a crash loop, not a completed pod)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis

from schemas.keys import queue_name
from tests.fixtures.services import REPO, worker_env


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "worker.cli", "worker", "--loglevel", "INFO"],
    [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=threads",
     "--loglevel=INFO"],
], ids=["dualstream-worker", "celery-worker"])
def test_a_worker_whose_model_does_not_load_exits_non_zero(
    command: list[str], redis_url: str, tmp_path: Path
) -> None:
    model = f"local-dir:{tmp_path / 'no-such-model'}"
    broker = redis.Redis.from_url(redis_url)
    queue = queue_name(model)
    broker.lpush(queue, b"left alone")
    finished = subprocess.run(command, env=worker_env(redis_url=redis_url, model=model,
                                                      health_dir=str(tmp_path / "health")),
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    log = finished.stdout + finished.stderr
    assert finished.returncode == 1, log[-3000:]
    assert "cannot start" in log
    assert broker.lrange(queue, 0, -1) == [b"left alone"]
