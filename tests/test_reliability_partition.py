"""A worker cut off from Redis for longer than the visibility timeout: another worker finishes
what it held meanwhile, and when the first comes back no row is written twice.

The cut is a TCP proxy between that worker and Redis that stops forwarding (its connections
stay open and silent, as behind a partition), then forwards again.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from control.objects import LocalOutputStore
from producer.client import Client
from schemas.jobs import Job, Task
from schemas.keys import ShardPaths, queue_name
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.faults import (
    SLOW_FORWARD_ENV,
    held_messages,
    message_jobs,
    wait_for,
    worker_launcher,
)

pytestmark = pytest.mark.timeout(300)
_ = worker_launcher  # a fixture

VISIBILITY_TIMEOUT_S = 4
CUT_S = 3 * VISIBILITY_TIMEOUT_S


class SilentProxy:
    """Forwards TCP to a port; `cut()` stops forwarding in both directions until `mend()`."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream = upstream_port
        self._flowing = threading.Event()
        self._flowing.set()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self._flowing.clear()

    def mend(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, target), daemon=True).start()

    def _pipe(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                data = source.recv(65536)
                if not data:
                    break
                self._flowing.wait()  # what was read during the cut is held until it mends
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def proxy(redis_url: str) -> Iterator[SilentProxy]:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = SilentProxy(port)
    yield proxy
    proxy.mend()
    proxy.close()


def job_ids(raw: bytes) -> set[str]:
    return {Job.model_validate(job).job_id for job in message_jobs(raw)}


def test_a_worker_cut_off_longer_than_the_visibility_timeout_duplicates_nothing(
        proxy: SilentProxy, worker_launcher: Any, redis_url: str,
        tiny_model_dirs: dict[str, str], tmp_path: Path) -> None:
    model = tiny_model_dirs["openclip"]
    output = tmp_path / "out"
    common = {"model": model, "output_uri": output.as_uri(),
              "visibility_timeout_s": VISIBILITY_TIMEOUT_S, "claim_lease_s": VISIBILITY_TIMEOUT_S,
              "max_inflight_messages": 4, "max_batch_items": 8}
    redis_port = redis_url.rsplit(":", 1)[1].split("/")[0]
    cut_off = worker_launcher({**common, "redis_url": redis_url.replace(redis_port,
                                                                        str(proxy.port)),
                               "health_dir": str(tmp_path / "h1")},
                              faults={SLOW_FORWARD_ENV: "0.3"})
    client = Client(Settings(redis_url=redis_url, model=model))
    ids = client.submit_many([Job(task=Task.TEXT_EMBEDDING, text=f"sentence {i}", model=model)
                              for i in range(160)], per_message=8)
    broker = client.redis
    wait_for(lambda: len(held_messages(broker)) >= 2, 60, "the first worker to hold messages")
    proxy.cut()
    cut_at = time.monotonic()
    held_at_cut = held_messages(broker)
    stranded = set().union(*(job_ids(raw) for raw in held_at_cut))
    other = worker_launcher({**common, "redis_url": redis_url,
                             "health_dir": str(tmp_path / "h2")})
    wait_for(lambda: all(s is Status.DONE for s in client.results.statuses(sorted(stranded))),
             120, "the cut-off worker's jobs to be finished by the other worker")
    time.sleep(max(0.0, CUT_S - (time.monotonic() - cut_at)))
    proxy.mend()

    results = client.wait(ids, timeout=180)
    assert [r.status for r in results] == [Status.DONE] * len(ids)
    store = LocalOutputStore(output.as_uri())
    rows = [job for key in store.list(ShardPaths(model, "text").directory)
            if key.endswith(".json")
            for job in json.loads(store.get(key) or b"{}")["jobs"]]
    assert Counter(rows) == Counter(set(ids)), "one committed row per job"
    assert other.output().count("succeeded in") > 0
    wait_for(lambda: held_messages(broker) == [] and broker.llen(queue_name(model)) == 0, 60,
             "nothing waiting or held")
    other.stop()
    again = client.submit_many([Job(task=Task.TEXT_EMBEDDING, text=f"after the cut {i}",
                                    model=model) for i in range(16)], per_message=8)
    assert all(r.status is Status.DONE for r in client.wait(again, timeout=120)), \
        "the cut-off worker came back and consumes again"
    assert cut_off.process.poll() is None
