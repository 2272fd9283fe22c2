"""Flower shows dualstream's workers and tasks (Celery task events are on by default)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from producer.client import Client
from schemas.jobs import Job, Task
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.services import REPO, free_port, worker_env

pytestmark = pytest.mark.timeout(300)


def flower_api(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/{path}", timeout=10) as response:
        return json.loads(response.read())


def test_flower_sees_the_worker_and_its_finished_task(
        start_worker: Any, redis_url: str, tiny_model_dirs: dict[str, str],
        tmp_path: Path) -> None:
    model = tiny_model_dirs["openclip"]
    port = free_port()
    # How docs/operations.md runs it: Celery's own command, pointed at dualstream's Redis.
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "--broker", redis_url, "flower",
         f"--port={port}", "--address=127.0.0.1"],
        env={**worker_env(), "FLOWER_UNAUTHENTICATED_API": "true"}, cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "flower.log").open("wb"))
    try:
        start_worker(redis_url=redis_url, model=model)
        client = Client(Settings(redis_url=redis_url, model=model))
        job_id = client.submit(Job(task=Task.TEXT_EMBEDDING, text="a cat", model=model))
        assert client.result(job_id, timeout=120).status is Status.DONE
        deadline = time.monotonic() + 60
        while True:
            try:
                workers = flower_api(port, "workers?refresh=1")
                tasks = flower_api(port, "tasks")
            except OSError:
                workers, tasks = {}, {}
            succeeded = [t for t in tasks.values()
                         if t.get("name") == "dualstream.process" and t.get("state") == "SUCCESS"]
            if any(name.startswith("dualstream-") for name in workers) and succeeded:
                break
            assert time.monotonic() < deadline, (workers, tasks,
                                                 (tmp_path / "flower.log").read_text()[-2000:])
            time.sleep(0.5)
    finally:
        flower.terminate()
        flower.wait(30)
