"""Poison messages: a message that kills its worker on every delivery is quarantined after
`max_deliveries` deliveries into the dead-letter store (with its payload and what is known of
its last error), without taking innocent messages with it; `dualstream dlq` manages the store.

The end-to-end test needs an input that kills the worker process: the worker runs with a
test-only fault installed from tests/fixtures/faults.py that SIGKILLs the process (as the
kernel's OOM killer would) when it decodes bytes that start with a marker. Production code
has no such hook.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from control.deadletters import DeadLetterStore
from control.results import Reservation
from producer.client import Client
from schemas.errors import ErrorCode, JobBusy, TransientError
from schemas.jobs import Job, JobMessage, Task
from schemas.keys import RedisKeys, queue_name
from schemas.records import encode_done
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.faults import (
    KILL_ON_ENV,
    RAISE_ON_ENV,
    celery_message,
    message_jobs,
    wait_for,
    worker_launcher,
)
from tests.fixtures.services import REPO, worker_env
from tests.images import jpeg_bytes
from worker.message_policy import MAX_COUNTDOWN_FRACTION
from worker.runtime import Runtime, build_runtime
from worker.suspect_gate import SuspectGate

pytestmark = pytest.mark.timeout(300)
_ = worker_launcher  # a fixture

MAX_DELIVERIES = 2
MARKER = "POISON"


def dlq_cli(redis_url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dualstream.cli", "dlq", *args],
                          env=worker_env(redis_url=redis_url), cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=check)


def test_a_message_that_kills_its_worker_every_time_is_quarantined_after_n_deliveries(
        worker_launcher: Any, redis_url: str, s3_endpoint: str, s3: Any, bucket: str,
        tiny_model_dirs: dict[str, str], tmp_path: Path) -> None:
    model = tiny_model_dirs["openclip"]
    settings = {"redis_url": redis_url, "s3_endpoint_url": s3_endpoint, "model": model,
                "output_uri": f"s3://{bucket}/embeddings", "health_dir": str(tmp_path / "h"),
                "max_deliveries": MAX_DELIVERIES, "visibility_timeout_s": 5,
                "claim_lease_s": 5, "max_inflight_messages": 4}
    for i in range(6):
        s3.put_object(Bucket=bucket, Key=f"good/{i}.jpg", Body=jpeg_bytes(i))
    s3.put_object(Bucket=bucket, Key="bad/poison.jpg", Body=MARKER.encode() + jpeg_bytes(9))
    client = Client(Settings(redis_url=redis_url, model=model))

    def image(key: str) -> Job:
        return Job(task=Task.IMAGE_EMBEDDING, image=f"s3://{bucket}/{key}", model=model)

    innocent = [client.submit_many([image(f"good/{i}.jpg"), image(f"good/{i + 3}.jpg")])
                for i in range(3)]
    poison = client.submit(image("bad/poison.jpg"))

    deaths = 0
    while client.status(poison) is not Status.FAILED:
        assert deaths <= MAX_DELIVERIES, "quarantined after at most N lost deliveries"
        worker = worker_launcher(settings, faults={KILL_ON_ENV: MARKER}, wait_ready=False)
        wait_for(lambda: worker.process.poll() is not None  # noqa: B023
                 or client.status(poison) is Status.FAILED, 120, "a death or the quarantine")
        if worker.process.poll() is not None:
            assert worker.process.returncode == -9
            deaths += 1
    assert deaths == MAX_DELIVERIES
    assert worker.process.poll() is None, "the quarantining worker lives on"

    failed = client.result(poison, timeout=10)
    assert failed.error is not None and failed.error.code is ErrorCode.POISON_MESSAGE
    ids = [job_id for pair in innocent for job_id in pair]
    assert all(r.status is Status.DONE for r in client.wait(ids, timeout=120))
    store = DeadLetterStore(redis.Redis.from_url(redis_url), RedisKeys())
    [letter] = store.list()
    assert letter.code is ErrorCode.POISON_MESSAGE and letter.deliveries == MAX_DELIVERIES
    assert JobMessage.model_validate(letter.payload).jobs[0].job_id == poison
    assert f"worker was lost {MAX_DELIVERIES} times" in letter.error
    assert letter.queue == queue_name(model)

    # A malformed message is dead-lettered too; then the operator's commands.
    broker = redis.Redis.from_url(redis_url)
    broker.lpush(queue_name(model), celery_message([{"jobs": []}], queue=queue_name(model)))
    wait_for(lambda: len(store.list()) == 2, 60, "the malformed message's dead letter")
    worker.stop()
    invalid = next(d for d in store.list() if d.code is ErrorCode.INVALID_JOB)

    listed = dlq_cli(redis_url, "list").stdout
    assert letter.id in listed and "poison_message" in listed and invalid.id in listed
    shown = json.loads(dlq_cli(redis_url, "show", letter.id).stdout)
    assert shown["payload"] == letter.payload and shown["error"] == letter.error
    assert dlq_cli(redis_url, "replay", letter.id).stdout.startswith(f"replayed {letter.id}")
    [message] = broker.lrange(queue_name(model), 0, -1)
    assert _job_ids(message) == [poison]
    refused = dlq_cli(redis_url, "replay", invalid.id, check=False)
    assert refused.returncode != 0 and "not a valid job message" in refused.stderr
    assert dlq_cli(redis_url, "purge", "--yes").stdout.strip() == "purged 1"
    assert dlq_cli(redis_url, "list").stdout == "" and store.list() == []



def test_a_message_whose_handling_raises_on_every_delivery_is_dead_lettered_never_lost(
        worker_launcher: Any, redis_url: str, tiny_model_dirs: dict[str, str],
        tmp_path: Path) -> None:
    """A real worker: an unexpected exception (a bug) on every delivery is requeued, never
    acknowledged, until `max_deliveries`, then quarantined with that error; its neighbours
    complete."""
    model = tiny_model_dirs["openclip"]
    settings = {"redis_url": redis_url, "model": model, "max_deliveries": MAX_DELIVERIES,
                "output_uri": (tmp_path / "out").as_uri(), "health_dir": str(tmp_path / "h")}
    worker = worker_launcher(settings, faults={RAISE_ON_ENV: "trigger"})
    client = Client(Settings(redis_url=redis_url, model=model))
    bad = client.submit(Job(task=Task.TEXT_EMBEDDING, text="trigger", model=model))
    good = client.submit_many([Job(task=Task.TEXT_EMBEDDING, text=f"fine {i}", model=model)
                               for i in range(4)])
    failed = client.result(bad, timeout=120)
    assert failed.error is not None and failed.error.code is ErrorCode.POISON_MESSAGE
    assert all(r.status is Status.DONE for r in client.wait(good, timeout=120))
    store = DeadLetterStore(redis.Redis.from_url(redis_url), RedisKeys())
    [letter] = store.list()
    assert letter.code is ErrorCode.POISON_MESSAGE
    assert "last error: RuntimeError: a bug that fires on 'trigger'" in letter.error
    assert JobMessage.model_validate(letter.payload).jobs[0].job_id == bad
    assert worker.output().count("not handled (RuntimeError") == MAX_DELIVERIES
    assert redis.Redis.from_url(redis_url).llen(queue_name(model)) == 0
    assert worker.process.poll() is None

def _job_ids(raw: bytes) -> list[str]:
    return [Job.model_validate(job).job_id for job in message_jobs(raw)]


# --- the rules, in one process -------------------------------------------------------------


@pytest.fixture
def runtime(redis_url: str, tmp_path: Path, tiny_encoders: dict[str, Any]) -> Any:
    encoder = tiny_encoders["openclip"]
    settings = Settings(redis_url=redis_url, model=encoder.model_id, local_root=str(tmp_path),
                        output_uri=(tmp_path / "out").as_uri(), health_dir=str(tmp_path / "h"),
                        max_deliveries=MAX_DELIVERIES)
    runtime = build_runtime(settings, encoder=encoder)
    yield runtime
    runtime.close()


def _image_jobs(tmp_path: Path, model: str, count: int) -> list[Job]:
    jobs = []
    for i in range(count):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(jpeg_bytes(i))
        jobs.append(Job(task=Task.IMAGE_EMBEDDING, image=str(path), model=model))
    return jobs


def _lost(runtime: Runtime, message_id: str, times: int) -> None:
    """What `times` sweeps of a dead consumer's in-flight list leave behind."""
    client = redis.Redis.from_url(runtime.settings.redis_dsn)
    key = RedisKeys().deliveries(message_id)
    client.hincrby(key, "lost", times)
    client.hset(key, mapping={"worker": "host-1234-abcd", "lost_at": int(time.time() * 1000)})


def test_a_poison_message_of_several_jobs_is_split_so_that_only_the_culprit_is_quarantined(
        runtime: Runtime, tmp_path: Path) -> None:
    model = runtime.settings.model
    done, culprit, other = _image_jobs(tmp_path, model, 3)
    runtime.policy.handle({"jobs": [done.model_dump(mode="json")]}, message_id="m0", attempt=1)
    payload = JobMessage(jobs=[done, culprit, other], run_id="run-x").model_dump(mode="json")
    _lost(runtime, "m1", MAX_DELIVERIES)

    outcome = runtime.policy.handle(payload, message_id="m1", attempt=1)
    assert not outcome.dead_lettered and runtime.dead_letters.list() == []
    split = [JobMessage.model_validate(message) for message in outcome.resend]
    assert [m.jobs for m in split] == [[culprit], [other]], "unfinished jobs, one per message"
    assert {m.run_id for m in split} == {"run-x"}
    assert runtime.dead_letters.previous_delivery("m1") is None

    _lost(runtime, "m2", MAX_DELIVERIES)
    outcome = runtime.policy.handle(outcome.resend[0], message_id="m2", attempt=1)
    assert outcome.dead_lettered
    [letter] = runtime.dead_letters.list()
    assert letter.payload == outcome_payload(culprit) and letter.deliveries == MAX_DELIVERIES
    assert "host-1234" in letter.error
    result = runtime.results.get(culprit.job_id)
    assert result is not None and result.error is not None
    assert result.error.code is ErrorCode.POISON_MESSAGE and letter.id in result.error.message
    assert runtime.results.get(other.job_id) is None, "an innocent job is not failed"


def outcome_payload(job: Job) -> dict[str, Any]:
    return JobMessage(jobs=[job], run_id="run-x").model_dump(mode="json")


def test_an_error_raised_on_every_delivery_quarantines_with_the_last_error(
        runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    [job] = _image_jobs(tmp_path, runtime.settings.model, 1)
    payload = {"jobs": [job.model_dump(mode="json")]}

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug that fires on this message")

    monkeypatch.setattr(runtime.pipeline, "submit", broken)
    for _ in range(MAX_DELIVERIES):
        with pytest.raises(RuntimeError):
            runtime.policy.handle(payload, message_id="m", attempt=1)
    assert runtime.policy.handle(payload, message_id="m", attempt=1).dead_lettered
    [letter] = runtime.dead_letters.list()
    assert letter.code is ErrorCode.POISON_MESSAGE
    assert "last error: RuntimeError: a bug that fires on this message" in letter.error


def test_only_a_message_put_back_or_retried_is_looked_up_for_earlier_deliveries(
        runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first delivery cannot have a delivery record (only a requeue or the sweep leaves one
    behind, and both mark the message redelivered: control/inflight.py): it costs no read."""
    looked_up: list[str] = []
    real = runtime.dead_letters.previous_delivery
    monkeypatch.setattr(runtime.dead_letters, "previous_delivery",
                        lambda message_id: looked_up.append(message_id) or real(message_id))
    jobs = _image_jobs(tmp_path, runtime.settings.model, 4)
    for n, (job, redelivered, attempt) in enumerate(
            zip(jobs, [False, True, None, False], [1, 1, 1, 2], strict=True)):
        outcome = runtime.policy.handle({"jobs": [job.model_dump(mode="json")]},
                                        message_id=f"m{n}", attempt=attempt,
                                        redelivered=redelivered)
        assert outcome.requeue is None and outcome.retry is None
    assert looked_up == ["m1", "m2", "m3"]


def test_a_redis_outage_while_handling_is_not_counted_as_a_lost_delivery(
        runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    [job] = _image_jobs(tmp_path, runtime.settings.model, 1)
    payload = {"jobs": [job.model_dump(mode="json")]}

    def unreachable(*_: Any, **__: Any) -> Any:
        raise redis.ConnectionError("Redis went away")

    monkeypatch.setattr(runtime.pipeline, "submit", unreachable)
    for _ in range(MAX_DELIVERIES + 2):
        with pytest.raises(redis.ConnectionError):
            runtime.policy.handle(payload, message_id="m", attempt=1)
    assert runtime.dead_letters.previous_delivery("m") is None
    assert runtime.dead_letters.list() == []


def test_a_suspect_message_runs_alone_and_goes_before_new_work() -> None:
    gate, events = SuspectGate(), []
    release_a = threading.Event()

    def run(name: str, exclusive: bool, hold: threading.Event | None = None) -> None:
        with gate.enter(exclusive=exclusive, timeout=30) as entered:
            assert entered
            events.append(f"+{name}")
            if hold is not None:
                hold.wait(30)
            time.sleep(0.05)  # room for another thread to (wrongly) enter meanwhile
            events.append(f"-{name}")

    def wait_until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.005)

    first = threading.Thread(target=run, args=("a", False, release_a))
    first.start()
    wait_until(lambda: events == ["+a"])
    suspect = threading.Thread(target=run, args=("suspect", True))
    suspect.start()
    wait_until(lambda: gate._suspects_waiting == 1)
    later = threading.Thread(target=run, args=("b", False))  # arrives while the suspect waits
    later.start()
    time.sleep(0.05)
    release_a.set()
    for thread in (first, suspect, later):
        thread.join()
    assert events == ["+a", "-a", "+suspect", "-suspect", "+b", "-b"]
    with gate.enter(exclusive=True, timeout=1), gate.enter(exclusive=False, timeout=0.1) as ok:
        assert not ok, "no other message while a suspect runs"


def test_a_message_waiting_for_another_writers_row_may_wait_out_a_whole_lease(
        runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting for a row another writer holds is no failure of the message: it is retried past
    `max_retries` for as many capped countdowns as a whole lease takes (a writer killed just
    after reserving leaves one), then given up like any other. Other errors get `max_retries`."""
    settings = runtime.settings
    [job] = _image_jobs(tmp_path, settings.model, 1)
    record = encode_done(run_id=None, finished_at=time.time(), attempts=1, dim=4,
                         shard="elsewhere", row=0, labels=None, truncated=False, embedding=None)
    [claim] = runtime.results.reserve([Reservation(job.job_id, record)], "elsewhere",
                                      lease_s=settings.claim_lease_s)
    assert claim.state == "new"
    payload = {"jobs": [job.model_dump(mode="json")]}
    lease_retries = math.ceil(settings.claim_lease_s / (
        settings.visibility_timeout_s * MAX_COUNTDOWN_FRACTION)) + 1
    last_wait = settings.max_retries + lease_retries
    outcome = runtime.policy.handle(payload, message_id="b", attempt=last_wait)
    assert isinstance(outcome.retry, JobBusy) and outcome.waits_for_lease
    assert not outcome.dead_lettered and runtime.dead_letters.list() == []
    assert runtime.policy.handle(payload, message_id="b", attempt=last_wait + 1).dead_lettered

    (tmp_path / "other").mkdir()
    [other] = _image_jobs(tmp_path / "other", settings.model, 1)

    def refused(*_: Any, **__: Any) -> Any:
        raise TransientError("the pipeline is full")

    monkeypatch.setattr(runtime.pipeline, "submit", refused)
    other_payload = {"jobs": [other.model_dump(mode="json")]}
    outcome = runtime.policy.handle(other_payload, message_id="t",
                                    attempt=settings.max_retries)
    assert outcome.retry is not None and not outcome.waits_for_lease
    assert runtime.policy.handle(other_payload, message_id="t",
                                 attempt=settings.max_retries + 1).dead_lettered


def test_jobs_waiting_for_a_row_beside_jobs_that_failed_go_on_in_a_message_of_their_own(
        runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Giving up on a message fails its jobs, but cannot fail a row another writer holds within
    its lease: if that writer is dead, nobody would finish the job. So such jobs are sent again
    on their own, and only the others fail."""
    settings = runtime.settings
    waiting, failing = _image_jobs(tmp_path, settings.model, 2)
    record = encode_done(run_id=None, finished_at=time.time(), attempts=1, dim=4,
                         shard="elsewhere", row=0, labels=None, truncated=False, embedding=None)
    runtime.results.reserve([Reservation(waiting.job_id, record)], "elsewhere",
                            lease_s=settings.claim_lease_s)
    submit = runtime.pipeline.submit

    def the_second_job_fails(jobs: list[Job], **kwargs: Any) -> list[Any]:
        failed: concurrent.futures.Future[Any] = concurrent.futures.Future()
        failed.set_exception(TransientError("S3 is away"))
        return [*submit(jobs[:1], **kwargs), failed]

    monkeypatch.setattr(runtime.pipeline, "submit", the_second_job_fails)
    payload = JobMessage(jobs=[waiting, failing], run_id="run-w").model_dump(mode="json")
    outcome = runtime.policy.handle(payload, message_id="w",
                                    attempt=settings.max_retries + 1)
    assert outcome.dead_lettered
    assert [JobMessage.model_validate(m).jobs for m in outcome.resend] == [[waiting]]
    assert JobMessage.model_validate(outcome.resend[0]).run_id == "run-w"
    assert runtime.results.statuses([waiting.job_id, failing.job_id]) == [
        Status.RUNNING, Status.FAILED]
