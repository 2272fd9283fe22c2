"""`dualstream worker --processes N`: a supervisor runs N one-process workers on one queue
(worker/supervisor.py).

Real processes throughout: a private redis-server, the tiny OpenCLIP model, text jobs, outputs
in a local directory. Two children both consume and every job ends in exactly one row;
SIGTERM to the supervisor drains every child and exits 0; a child killed (SIGKILL, as the OOM
killer would) stops the others and the supervisor exits non-zero, and the dead child's held
messages come back to the next worker. One process is the plain worker (every other worker
test covers it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from producer.client import Client
from schemas.jobs import Job, Task
from schemas.keys import ShardPaths, model_slug, queue_name
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.faults import held_messages, message_jobs, wait_for
from tests.fixtures.services import REPO, WorkerProcess, worker_env
from worker.health import probe
from worker.supervisor import child_env

pytestmark = pytest.mark.timeout(300)

GRACE_S = 8.0
# A killed child's row claims expire this soon, so the next worker need not wait the default 120 s
CLAIM_LEASE_S = 3
# Two processes' exits and this test's polling, on top of the grace period: about the margin
# k8s/base/worker/deployment.yaml leaves for the exit.
EXIT_SLACK_S = 6.0


def start_two(start_worker: Any, redis_url: str, model: str, tmp_path: Path) -> WorkerProcess:
    """A supervisor with two children, once both are ready."""
    worker: WorkerProcess = start_worker(
        argv=[sys.executable, "-m", "dualstream.cli", "worker", "--processes", "2",
              "--loglevel", "INFO"],
        redis_url=redis_url, model=model, output_uri=(tmp_path / "out").as_uri(),
        health_dir=str(tmp_path / "health"), health_interval_s=0.5, heartbeat_ttl_s=2,
        claim_lease_s=CLAIM_LEASE_S, drain_timeout_s=GRACE_S)
    wait_for(lambda: worker.output().count(" ready.") == 2, 120, "both children ready")
    return worker


def text_jobs(model: str, count: int) -> list[Job]:
    return [Job(task=Task.TEXT_EMBEDDING, text=f"a caption, number {i}", model=model,
                return_embedding=False, idempotency_key=str(i)) for i in range(count)]


def manifests(tmp_path: Path, model: str) -> list[dict[str, Any]]:
    folder = tmp_path / "out" / ShardPaths(model, "text").directory
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def rows(tmp_path: Path, model: str) -> list[str]:
    return [job_id for manifest in manifests(tmp_path, model) for job_id in manifest["jobs"]]


def statuses(client: Client, ids: list[str]) -> dict[str, Status | None]:
    return dict(zip(ids, client.results.statuses(ids), strict=True))


def queued_ids(broker: redis.Redis, queue: str) -> set[str]:
    return {Job.model_validate(job).job_id
            for raw in broker.lrange(queue, 0, -1) for job in message_jobs(raw)}


def test_two_processes_consume_one_queue_and_finish_every_job_once(
        start_worker: Any, redis_url: str, tiny_model_dirs: dict[str, str],
        tmp_path: Path) -> None:
    model = tiny_model_dirs["openclip"]
    worker = start_two(start_worker, redis_url, model, tmp_path)
    children = psutil.Process(worker.process.pid).children()
    assert len(children) == 2
    wait_for(lambda: probe(tmp_path / "health", "ready", 2.0), 10, "the pod's probe: ready")
    assert sorted(p.name for p in (tmp_path / "health").iterdir()) == ["worker-0", "worker-1"]

    client = Client(Settings(redis_url=redis_url, model=model))
    ids = client.submit_many(text_jobs(model, 800), per_message=4)
    wait_for(lambda: set(statuses(client, ids).values()) == {Status.DONE}, 120,
             "every job done")

    assert sorted(rows(tmp_path, model)) == sorted(ids), "each job has exactly one row"
    host = socket.gethostname()
    writers = {manifest["writer"] for manifest in manifests(tmp_path, model)}
    assert writers == {f"{host}-{child.pid}" for child in children}, "both children consumed"
    for i in (0, 1):
        assert f"dualstream-{model_slug(model)}-{i}@" in worker.output()  # the node names


def test_sigterm_to_the_supervisor_drains_every_child_and_exits_0(
        start_worker: Any, redis_url: str, tiny_model_dirs: dict[str, str],
        tmp_path: Path) -> None:
    model = tiny_model_dirs["openclip"]
    worker = start_two(start_worker, redis_url, model, tmp_path)
    children = psutil.Process(worker.process.pid).children()
    client = Client(Settings(redis_url=redis_url, model=model))
    ids = client.submit_many(text_jobs(model, 4000), per_message=4)
    wait_for(lambda: Status.DONE in statuses(client, ids[:400]).values(), 60, "some jobs done")

    signalled = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    worker.process.wait(GRACE_S + EXIT_SLACK_S)
    elapsed = time.monotonic() - signalled

    assert worker.process.returncode == 0, worker.output()[-3000:]
    assert elapsed <= GRACE_S + EXIT_SLACK_S
    assert not any(child.is_running() for child in children)
    assert worker.output().count("draining held messages") == 2
    broker = redis.Redis.from_url(redis_url)
    assert held_messages(broker) == []
    done = {job_id for job_id, status in statuses(client, ids).items() if status is Status.DONE}
    assert set(ids) <= done | queued_ids(broker, queue_name(model)), "done or on the queue"
    found = rows(tmp_path, model)
    assert done <= set(found) and len(found) == len(set(found)), "done jobs have one row each"
    assert not probe(tmp_path / "health", "ready", 60.0), "not ready once stopped"


def test_a_child_killed_stops_the_others_and_its_messages_come_back(
        start_worker: Any, redis_url: str, tiny_model_dirs: dict[str, str],
        tmp_path: Path) -> None:
    """The supervisor exits 128 + 9 after stopping the live child (it drains, exit 0), so
    Kubernetes restarts the pod; the next worker finishes every job, each in one row."""
    model = tiny_model_dirs["openclip"]
    worker = start_two(start_worker, redis_url, model, tmp_path)
    victim, survivor = psutil.Process(worker.process.pid).children()
    client = Client(Settings(redis_url=redis_url, model=model))
    ids = client.submit_many(text_jobs(model, 4000), per_message=4)
    wait_for(lambda: Status.DONE in statuses(client, ids[:400]).values(), 60, "some jobs done")

    victim.kill()
    worker.process.wait(GRACE_S + EXIT_SLACK_S)
    assert worker.process.returncode == 128 + signal.SIGKILL, worker.output()[-3000:]
    assert "exited unasked" in worker.output()
    assert not survivor.is_running() and "draining held messages" in worker.output(), \
        "the survivor was stopped, and drained"

    start_worker(redis_url=redis_url, model=model, output_uri=(tmp_path / "out").as_uri(),
                 health_dir=str(tmp_path / "health-next"), heartbeat_ttl_s=2,
                 claim_lease_s=CLAIM_LEASE_S)
    wait_for(lambda: set(statuses(client, ids).values()) == {Status.DONE}, 120,
             "every job done by the next worker")
    assert sorted(rows(tmp_path, model)) == sorted(ids), "each job has exactly one row"


def test_children_share_the_cores_and_keep_the_devices_and_their_own_health_files(
        tmp_path: Path) -> None:
    settings = Settings(model="m", worker_processes=2, health_dir=str(tmp_path))
    env = child_env(settings, 1, {"CUDA_VISIBLE_DEVICES": "0", "DUALSTREAM_MODEL": "m"},
                    cores=8)
    assert env["OMP_NUM_THREADS"] == "4" and env["CUDA_VISIBLE_DEVICES"] == "0"
    assert env["DUALSTREAM_HEALTH_DIR"] == str(tmp_path / "worker-1")
    assert env["DUALSTREAM_WORKER_PROCESSES"] == "1"
    assert child_env(settings, 0, {}, cores=1)["OMP_NUM_THREADS"] == "1"
    per_gpu = settings.model_copy(update={"worker_devices": ["2", "3"]})
    assert [child_env(per_gpu, i, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})["CUDA_VISIBLE_DEVICES"]
            for i in range(3)] == ["2", "3", "2"]
    with_metrics = settings.model_copy(update={"metrics_port": 9100})
    assert [child_env(with_metrics, i, {})["DUALSTREAM_METRICS_PORT"] for i in (0, 1)] == [
        "9100", "9101"]
    assert child_env(settings, 0, {"OMP_NUM_THREADS": "3"}, cores=8)["OMP_NUM_THREADS"] == "3"


def test_the_probe_passes_only_when_every_childs_file_is_fresh(tmp_path: Path) -> None:
    for i in (0, 1):
        (tmp_path / f"worker-{i}").mkdir()
        (tmp_path / f"worker-{i}" / "ready").touch()
    assert probe(tmp_path, "ready", 5.0)
    (tmp_path / "worker-1" / "ready").unlink()
    assert not probe(tmp_path, "ready", 5.0)
    (tmp_path / "worker-1" / "ready").touch()
    stale = time.time() - 10
    os.utime(tmp_path / "worker-0" / "ready", (stale, stale))
    assert not probe(tmp_path, "ready", 5.0)


def test_a_supervised_worker_whose_model_does_not_load_exits_non_zero(
        redis_url: str, tmp_path: Path) -> None:
    model = f"local-dir:{tmp_path / 'no-such-model'}"
    finished = subprocess.run(
        [sys.executable, "-m", "dualstream.cli", "worker", "--processes", "2"],
        env=worker_env(redis_url=redis_url, model=model, health_dir=str(tmp_path / "health")),
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1, (finished.stdout + finished.stderr)[-3000:]
