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
    [sys.executable, "-m", "dualstream.cli", "worker", "--loglevel", "INFO"],
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


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "dualstream.cli", "worker", "--loglevel", "INFO"],
    [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=threads",
     "--loglevel=INFO"],
], ids=["dualstream-worker", "celery-worker"])
def test_a_worker_without_the_worker_extra_exits_1_with_one_line_and_takes_nothing(
    command: list[str], redis_url: str, tmp_path: Path, tiny_model_dirs: dict[str, str]
) -> None:
    """An install without `[worker]`, imitated by a `torch` that cannot be imported."""
    shadow = tmp_path / "no-torch" / "torch"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    model = tiny_model_dirs["openclip"]
    broker = redis.Redis.from_url(redis_url)
    broker.lpush(queue_name(model), b"left alone")
    env = worker_env(redis_url=redis_url, model=model, health_dir=str(tmp_path / "health"))
    env["PYTHONPATH"] = f"{shadow.parent}:{env['PYTHONPATH']}"
    finished = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 1, finished.stdout + finished.stderr
    assert finished.stderr.strip().splitlines() == [
        "dualstream: this needs the worker extra (torch is missing): "
        "pip install 'dualstream[worker]'"]
    assert broker.lrange(queue_name(model), 0, -1) == [b"left alone"]
