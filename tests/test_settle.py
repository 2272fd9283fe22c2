"""Settling a job against a real redis-server: done, failed, retried, already done."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future

import numpy as np
import pytest
import redis

from control.results import Reservation, ResultStore
from schemas.errors import ErrorCode, ImageError, JobBusy, TransientError
from schemas.jobs import Job, Task
from schemas.keys import RedisKeys
from schemas.records import encode_record, shard_id_of
from schemas.results import JobResult, LabelScore, OutputLocation, Status
from tests.fixtures.records import as_stored
from worker.items import Item
from worker.local import free_port
from worker.outputs import OutputRow
from worker.settle import Settler, done_result

MODEL = "tiny/model"


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def results(client: redis.Redis) -> ResultStore:
    return ResultStore(client, RedisKeys(), ttl_s=3600)


@pytest.fixture
def unreachable() -> ResultStore:
    client = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    return ResultStore(client, RedisKeys(), ttl_s=3600)


def item(n: int = 0, *, return_embedding: bool = True) -> Item:
    job = Job(task=Task.IMAGE_EMBEDDING, model=MODEL, image=f"s3://src/{n}.jpg",
              return_embedding=return_embedding)
    return Item(job, Future(), attempts=2, enqueued_at=time.time())


def row(of: Item) -> OutputRow:
    vector = np.array([0.6, 0.8], dtype=np.float32)
    return OutputRow(of.job, vector, "etag", [LabelScore(label="cat", score=0.9)], False)


def test_a_done_result_carries_the_row_its_location_and_the_attempts() -> None:
    done = item()
    result = done_result(done, row(done), OutputLocation(shard="s1", row=3))
    assert result.status is Status.DONE and result.job_id == done.job.job_id
    assert result.embedding == pytest.approx([0.6, 0.8]) and result.embedding_dim == 2
    assert result.labels == [LabelScore(label="cat", score=0.9)]
    assert result.output == OutputLocation(shard="s1", row=3) and result.attempts == 2


def test_a_done_result_leaves_the_embedding_out_unless_asked() -> None:
    done = item(return_embedding=False)
    result = done_result(done, row(done), None)
    assert result.embedding is None and result.embedding_dim == 2


def test_done_jobs_resolve_their_futures_their_records_came_with_their_rows(
        unreachable: ResultStore) -> None:
    done = [item(n) for n in range(2)]
    finished = [(i, done_result(i, row(i), OutputLocation(shard="shard-1", row=n)))
                for n, i in enumerate(done)]
    Settler(unreachable).done(finished)  # no Redis: the shard writer recorded them
    for i, result in finished:
        assert i.future.result(0) == result


def test_a_permanent_failure_is_a_failed_result_in_the_store(results: ResultStore) -> None:
    bad = item()
    Settler(results).fail(bad, ImageError("not an image", code=ErrorCode.CORRUPT_IMAGE))
    result = bad.future.result(0)
    assert result.status is Status.FAILED and result.attempts == 2
    assert result.error is not None and result.error.code is ErrorCode.CORRUPT_IMAGE
    assert result.error.message == "not an image"
    assert results.get(bad.job.job_id) == as_stored(result)


def test_an_unexpected_exception_fails_the_job_as_internal_and_is_logged(
        results: ResultStore, caplog: pytest.LogCaptureFixture) -> None:
    bad = item()
    with caplog.at_level(logging.ERROR, logger="worker.settle"):
        Settler(results).fail(bad, KeyError("oops"))
    result = bad.future.result(0)
    assert result.error is not None and result.error.code is ErrorCode.INTERNAL
    assert result.error.message == "KeyError: 'oops'"
    assert [r.message for r in caplog.records] == [f"job {bad.job.job_id} failed unexpectedly"]


def test_a_permanent_failure_is_not_logged_as_unexpected(
        results: ResultStore, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="worker.settle"):
        Settler(results).fail(item(), ImageError("not an image"))
    assert caplog.records == []


@pytest.mark.parametrize(("error", "code"), [
    (TransientError("throttled"), ErrorCode.TRANSIENT_STORAGE),
    (JobBusy("held elsewhere", retry_after_s=1.0), ErrorCode.JOB_BUSY),
    (redis.ConnectionError("refused"), ErrorCode.TRANSIENT_BROKER),
    (redis.TimeoutError("timed out"), ErrorCode.TRANSIENT_BROKER),
])
def test_a_transient_failure_is_retried_and_nothing_is_recorded(
        results: ResultStore, error: Exception, code: ErrorCode) -> None:
    flaky = item()
    Settler(results).fail(flaky, error)
    with pytest.raises(TransientError) as raised:
        flaky.future.result(0)
    assert raised.value.code is code
    assert results.get(flaky.job.job_id) is None


def test_a_failure_that_cannot_be_recorded_is_retried(unreachable: ResultStore) -> None:
    bad = item()
    Settler(unreachable).fail(bad, ImageError("not an image"))
    with pytest.raises(TransientError, match="recording the failure failed") as raised:
        bad.future.result(0)
    assert raised.value.code is ErrorCode.TRANSIENT_BROKER


def test_a_settled_job_is_not_settled_again(results: ResultStore) -> None:
    settled = item()
    settle = Settler(results)
    settle.retry(settled, TransientError("first"))
    settle.fail(settled, ImageError("second"))
    settle.retry(settled, TransientError("third"))
    with pytest.raises(TransientError, match="first"):
        settled.future.result(0)
    assert results.get(settled.job.job_id) is None


def test_a_busy_job_is_retried_with_its_busy_error(results: ResultStore) -> None:
    busy_item, busy = item(), JobBusy("held by shard-2", retry_after_s=3.0)
    Settler(results).retry(busy_item, busy)
    assert busy_item.future.exception(0) is busy


def test_an_already_done_job_resolves_from_the_stored_result(results: ResultStore) -> None:
    earlier, again = item(), item()
    stored = done_result(earlier, row(earlier), OutputLocation(shard="old", row=0))
    write_row(results, stored)
    Settler(results).already_done(again)
    assert again.future.result(0) == as_stored(stored)


def test_an_already_done_job_whose_result_vanished_is_retried(results: ResultStore) -> None:
    gone = item()
    Settler(results).already_done(gone)
    with pytest.raises(TransientError, match="vanished") as raised:
        gone.future.result(0)
    assert raised.value.code is ErrorCode.TRANSIENT_BROKER



def write_row(results: ResultStore, result: JobResult) -> None:
    """What a shard writer leaves for a done job: its record, and its shard committed."""
    shard = shard_id_of(result.output.shard) if result.output else "s"
    results.reserve([Reservation(result.job_id, encode_record(result, None))], shard, 30)
    results.commit(shard, result.output.shard if result.output else "s")
