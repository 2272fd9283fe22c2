"""The `dualstream` command never leaves a user guessing: every mistake is one line on stderr,
`Error: … (hint: …)`, with a non-zero exit status (2 for usage, 1 otherwise, 130 when
interrupted); the traceback only with `--debug` or DUALSTREAM_DEBUG=1 (dualstream/cli.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from producer.bulk import BulkRequest, source_etag
from producer.client import Client
from schemas.jobs import Job, Task
from schemas.keys import RedisKeys, queue_name
from schemas.settings import Settings
from tests.fixtures.faults import wait_for
from tests.fixtures.services import REPO, worker_env
from worker.local import free_port, redis_server

MODEL = "some-org/some-model"


def dualstream(*args: str, timeout: float = 60,
               **settings: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dualstream.cli", *args],
                          env=worker_env(**settings), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(run: subprocess.CompletedProcess[str], status: int, *words: str) -> str:
    assert run.returncode == status, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), run.stderr
    assert "Traceback" not in run.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("args", "words"), [
    (["submit", "--text", "a cat"], ["no model", "DUALSTREAM_MODEL"]),
    (["submit", "--model", MODEL, "--image", "s3://b/k", "--labels", "cat, ,dog"],
     ["--labels", "blank", "hint:"]),
    (["submit", "--model", MODEL, "--image", "s3://b/k", "--labels", "cat", "--templates",
      "a photo"], ["--templates", "{}"]),
    (["submit", "--model", MODEL, "--image", "s3://b/k", "--labels", "cat", "--threshold", "2"],
     ["--threshold", "hint:"]),
    (["submit", "--model", MODEL], ["--image", "--text"]),
    (["bulk", "/no/such/folder", "--model", MODEL], ["no folder /no/such/folder"]),
], ids=["no-model", "blank-label", "template-without-slot", "threshold-2", "no-input",
        "missing-folder"])
def test_a_usage_error_is_one_line_with_a_hint_and_exit_status_2(
        args: list[str], words: list[str], redis_url: str) -> None:
    one_line_error(dualstream(*args, redis_url=redis_url), 2, "hint:", *words)


def test_a_wrong_redis_port_is_one_line_at_once() -> None:
    run = dualstream("submit", "--model", MODEL, "--text", "a cat", timeout=30,
                     redis_url=f"redis://127.0.0.1:{free_port()}/0")
    one_line_error(run, 1, "cannot reach Redis", "DUALSTREAM_REDIS_URL")


@pytest.mark.parametrize("password", [None, "wrong"])
def test_a_missing_or_wrong_redis_password_is_one_line(password: str | None) -> None:
    with redis_server("--requirepass", "secret") as server:
        url = server.url.replace("redis://", f"redis://:{password}@" if password else "redis://")
        run = dualstream("status", "run-0123456789abcdef", redis_url=url)
    one_line_error(run, 1, "password", "DUALSTREAM_REDIS_URL")


def test_unknown_ids_exit_1(redis_url: str) -> None:
    one_line_error(dualstream("status", "0" * 32, redis_url=redis_url), 1, "no job")
    one_line_error(dualstream("status", "run-0123456789abcdef", redis_url=redis_url), 1,
                   "no run")
    one_line_error(dualstream("results", "0" * 32, redis_url=redis_url), 1, "no result")


def test_a_submit_wait_that_runs_out_exits_1(redis_url: str) -> None:
    run = dualstream("submit", "--model", MODEL, "--text", "a cat", "--wait", "0.3",
                     redis_url=redis_url)
    one_line_error(run, 1, "not finished after 0.3 s", "dualstream results")


def test_a_bad_setting_names_its_variable(redis_url: str) -> None:
    run = dualstream("status", "0" * 32, redis_url=redis_url, max_batch_items="many")
    one_line_error(run, 2, "DUALSTREAM_MAX_BATCH_ITEMS")


def test_debug_shows_the_traceback(redis_url: str) -> None:
    for run in (dualstream("--debug", "status", "0" * 32, redis_url=redis_url),
                dualstream("status", "0" * 32, redis_url=redis_url, debug="1")):
        assert run.returncode != 0
        assert "Traceback" in run.stderr and "UserError: no job" in run.stderr


def test_a_run_is_named_before_its_first_job_and_ctrl_c_says_how_to_resume(
        redis_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(20_000):
        (folder / f"{i:05d}.jpg").write_bytes(b"")
    broker = redis.Redis.from_url(redis_url)
    args = [sys.executable, "-m", "dualstream.cli", "bulk", str(folder), "--model", MODEL,
            "--per-message", "1"]
    bulk = subprocess.Popen(args, env=worker_env(redis_url=redis_url), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert bulk.stdout is not None
    first = bulk.stdout.readline()
    run_id = BulkRequest(source=str(folder), model=MODEL).run_id
    assert first.startswith(f"run {run_id}: "), first
    wait_for(lambda: broker.llen(queue_name(MODEL)) >= 60, 60, "the run under way")
    bulk.send_signal(signal.SIGINT)
    _, err = bulk.communicate(timeout=60)
    assert bulk.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"Error: interrupted: run {run_id} has "), err[-2000:]
    assert "run the same command again to resume it: dualstream bulk " in last


def test_a_local_file_job_names_its_content(redis_url: str, tmp_path: Path) -> None:
    """The etag of a local source is the identity the worker checks (worker/sources.py)."""
    image = tmp_path / "a.jpg"
    image.write_bytes(b"first")
    client = Client(Settings(redis_url=redis_url, model=MODEL))
    first = client.embed_image(str(image))
    etag = source_etag(str(image))
    assert etag is not None
    image.write_bytes(b"second, longer")
    second = client.embed_image(str(image))
    assert second != first and source_etag(str(image)) != etag
    assert Job(task=Task.IMAGE_EMBEDDING, image=str(image), model=MODEL,
               etag=source_etag(str(image))).job_id == second
    assert source_etag("s3://bucket/a.jpg") is None


def test_status_follows_a_run_from_its_counters_then_sums_it_up(redis_url: str) -> None:
    run_id = "run-0123456789abcdef"
    broker = redis.Redis.from_url(redis_url)
    key = RedisKeys(Settings().key_prefix).run(run_id)
    broker.hset(key, mapping={"queued": 3, "done": 1, "listed": 1, "pass": 1})
    follow = subprocess.Popen([sys.executable, "-m", "dualstream.cli", "status", run_id,
                               "--follow"], env=worker_env(redis_url=redis_url), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    assert follow.poll() is None, "it follows the run until it finishes"
    broker.hset(key, mapping={"done": 2, "failed": 1, "failed:not_an_image": 1})
    out, err = follow.communicate(timeout=30)
    assert follow.returncode == 0, err
    assert "done 2, failed 1" in out and "job/s" in out  # the bar: counts and rate
    assert out.strip().splitlines()[-1] == (f"run {run_id} finished: 2 done of 3; 1 of 3 jobs "
                                            "failed (not_an_image 1)")
    piped = dualstream("status", run_id, redis_url=redis_url)  # not a terminal: one JSON line
    assert json.loads(piped.stdout) == {"run": run_id, "queued": 3, "done": 2, "failed": 1,
                                        "failed_by_code": {"not_an_image": 1}, "listed": True,
                                        "finished": True}
