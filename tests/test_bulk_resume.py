"""A bulk run is resumed where its listing stopped, and re-running a run that is fully queued
sends nothing again (producer/cli.py `bulk`, the run's counters and cursor)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import redis

from producer.bulk import BulkRequest
from producer.client import Client
from schemas.keys import queue_name
from schemas.settings import Settings
from tests.fixtures.faults import message_jobs, wait_for
from tests.fixtures.services import REPO, worker_env

MODEL = "some-org/some-model"
FILES = 20_000  # enough that the first run is still listing when it is killed


def bulk(folder: Path, redis_url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dualstream.cli", "bulk", str(folder), "--model", MODEL,
         "--per-message", "1"], env=worker_env(redis_url=redis_url), cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def queued_sources(broker: redis.Redis) -> Counter[str]:
    return Counter(job["image"] for raw in broker.lrange(queue_name(MODEL), 0, -1)
                   for job in message_jobs(raw))


def test_an_interrupted_bulk_run_resumes_after_its_cursor_and_counts_each_job_once(
        redis_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(FILES):
        (folder / f"{i:05d}.jpg").write_bytes(b"")  # bulk lists files; it never reads them
    broker = redis.Redis.from_url(redis_url)
    client = Client(Settings(redis_url=redis_url, model=MODEL))
    run_id = BulkRequest(source=str(folder), model=MODEL).run_id

    first = bulk(folder, redis_url)
    wait_for(lambda: broker.llen(queue_name(MODEL)) >= 60, 60, "the first run under way")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    interrupted = client.run_progress(run_id)
    assert not interrupted.listed and 0 < interrupted.queued < FILES
    assert interrupted.queued <= broker.llen(queue_name(MODEL))

    second = bulk(folder, redis_url)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err[-2000:]
    assert f"resuming after {interrupted.cursor}" in err
    progress = client.run_progress(run_id)
    assert progress.listed and progress.queued == FILES, progress
    sources = queued_sources(broker)
    assert len(sources) == FILES, "every file is queued"
    resent = sum(sources.values()) - FILES  # published but not yet counted when killed
    assert 0 <= resent <= 16, sources.most_common(3)

    third = bulk(folder, redis_url)
    out, err = third.communicate(timeout=60)
    assert third.returncode == 0 and "every job is already queued" in out, out + err
    assert sum(queued_sources(broker).values()) == FILES + resent, "nothing sent again"
    assert client.run_progress(run_id).queued == FILES


def test_a_run_another_producer_is_publishing_is_refused(redis_url: str,
                                                        tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    run_id = BulkRequest(source=str(folder), model=MODEL).run_id
    Client(Settings(redis_url=redis_url, model=MODEL)).runs.lock(run_id, "elsewhere-1", 30)
    refused = bulk(folder, redis_url)
    _, err = refused.communicate(timeout=60)
    assert refused.returncode == 1 and "another `dualstream bulk` is publishing" in err
    assert redis.Redis.from_url(redis_url).llen(queue_name(MODEL)) == 0
