"""Flower shows dualstream's workers and tasks (Celery task events are on by default), sent
in batches (worker/task_events.py): far fewer PUBLISHes than events, none lost."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import Client
from schemas.jobs import Job, Task
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.services import REPO, free_port, worker_env

pytestmark = pytest.mark.timeout(300)

TASKS = 24


def flower_api(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/{path}", timeout=10) as response:
        return json.loads(response.read())


class EventTap:
    """Every task-event message published on Redis, as Celery's fan-out sends them: how many
    messages, and the events they held (a `task.multi` message holds a list)."""

    def __init__(self, url: str) -> None:
        self.messages = 0
        self.events: Counter[str] = Counter()  # by type
        self.succeeded: set[str] = set()  # task ids
        self._lock = threading.Lock()
        self._pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(**{"*celeryev*task*": self._handle})
        self._thread = self._pubsub.run_in_thread(sleep_time=0.05, daemon=True)

    def _handle(self, message: dict[str, Any]) -> None:
        envelope = json.loads(message["data"])
        body = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        with self._lock:
            self.messages += 1
            for event in decoded if isinstance(decoded, list) else [decoded]:
                self.events[event["type"]] += 1
                if event["type"] == "task-succeeded":
                    self.succeeded.add(event["uuid"])

    def stop(self) -> None:
        self._thread.stop()


def _answers(port: int) -> bool:
    try:
        flower_api(port, "workers")
    except OSError:
        return False
    return True


def test_flower_sees_the_worker_and_its_finished_tasks_sent_in_batches(
        start_worker: Any, redis_url: str, tiny_model_dirs: dict[str, str],
        tmp_path: Path) -> None:
    model = tiny_model_dirs["openclip"]
    port = free_port()
    tap = EventTap(redis_url)
    # How docs/operations.md runs it: Celery's own command, pointed at dualstream's Redis.
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "--broker", redis_url, "flower",
         f"--port={port}", "--address=127.0.0.1"],
        env={**worker_env(), "FLOWER_UNAUTHENTICATED_API": "true"}, cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "flower.log").open("wb"))
    try:
        # Flower sees only the events sent after it has subscribed: it answers first.
        deadline = time.monotonic() + 60
        while not _answers(port):
            assert time.monotonic() < deadline, (tmp_path / "flower.log").read_text()[-2000:]
            time.sleep(0.2)
        start_worker(redis_url=redis_url, model=model)
        client = Client(Settings(redis_url=redis_url, model=model))
        job_ids = [client.submit(Job(task=Task.TEXT_EMBEDDING, text=f"a cat, {n}", model=model))
                   for n in range(TASKS)]  # a message each
        assert all(client.result(job_id, timeout=120).status is Status.DONE
                   for job_id in job_ids)
        deadline = time.monotonic() + 60
        while True:
            try:
                workers = flower_api(port, "workers?refresh=1")
                tasks = flower_api(port, "tasks")
            except OSError:
                workers, tasks = {}, {}
            succeeded = [t for t in tasks.values()
                         if t.get("name") == "dualstream.process" and t.get("state") == "SUCCESS"]
            if (any(name.startswith("dualstream-") for name in workers)
                    and len(succeeded) == TASKS and len(tap.succeeded) == TASKS):
                break
            assert time.monotonic() < deadline, (workers, tasks, tap.events,
                                                 (tmp_path / "flower.log").read_text()[-2000:])
            time.sleep(0.5)
        # Every event arrived, once; in fewer messages than events (Celery alone: one each).
        assert tap.events == {"task-received": TASKS, "task-started": TASKS,
                              "task-succeeded": TASKS}
        assert tap.messages < 3 * TASKS / 2, (tap.messages, tap.events)
    finally:
        tap.stop()
        flower.terminate()
        flower.wait(30)
