"""Records, claims and run counters against a real redis-server (control/results.py)."""

from __future__ import annotations

import time

import pytest
import redis

from control.results import ResultStore, RunStore, Settlement
from schemas.errors import ErrorCode
from schemas.keys import RedisKeys
from schemas.results import ErrorInfo, JobResult, LabelScore, OutputLocation, Status, Timings

KEYS = RedisKeys("t-store")
SHARD = "s3://b/out/m/image/261130133240-0123456789.npy"


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def results(client: redis.Redis) -> ResultStore:
    return ResultStore(client, KEYS, ttl_s=3600)


@pytest.fixture
def runs(client: redis.Redis) -> RunStore:
    return RunStore(client, KEYS, ttl_s=3600)


def done(job_id: str, row: int = 0) -> JobResult:
    return JobResult(job_id=job_id, status=Status.DONE, embedding_dim=4,
                     labels=[LabelScore(label="cat", score=0.75)],
                     output=OutputLocation(shard=SHARD, row=row),
                     timings=Timings(finished_at=time.time()), attempts=1)


def failed(job_id: str, code: ErrorCode = ErrorCode.CORRUPT_IMAGE) -> JobResult:
    return JobResult(job_id=job_id, status=Status.FAILED, attempts=1,
                     error=ErrorInfo(code=code, message="broken"))


def test_a_single_submission_is_queued_once(results: ResultStore) -> None:
    assert results.enqueue(["j1", "j2"]) == [True, True]
    assert results.enqueue(["j1"]) == [False]
    assert results.statuses(["j1", "j2", "j3"]) == [Status.QUEUED, Status.QUEUED, None]


def test_a_done_job_is_not_queued_again_a_failed_one_is(results: ResultStore) -> None:
    results.settle([Settlement(done("ok")), Settlement(failed("bad"))])
    assert results.enqueue(["ok", "bad"]) == [False, True]
    assert results.statuses(["ok", "bad"]) == [Status.DONE, Status.QUEUED]
    assert results.enqueue(["ok"], resend=True) == [True]
    assert results.statuses(["ok"]) == [Status.DONE]  # never set back


def test_a_job_being_written_keeps_its_claim(results: ResultStore) -> None:
    results.claim(["w"], "shard-1", lease_s=30)
    assert results.statuses(["w"]) == [Status.RUNNING]
    assert results.enqueue(["w"]) == [False]
    assert results.enqueue(["w"], resend=True) == [True]
    assert results.statuses(["w"]) == [Status.RUNNING]


def test_a_settled_record_reads_back_with_its_shards_uri(results: ResultStore,
                                                          client: redis.Redis) -> None:
    results.claim(["a"], "261130133240-0123456789", lease_s=30)
    assert results.settle([Settlement(done("a", row=3))]) == [True]
    [back] = ResultStore(client, KEYS, ttl_s=3600).get_many(["a"])
    assert back is not None and back.output == OutputLocation(shard=SHARD, row=3)
    assert back.labels == [LabelScore(label="cat", score=0.75)]
    assert 3590 <= client.ttl(KEYS.record("a")) <= 3600


def test_settling_twice_counts_once(results: ResultStore, runs: RunStore) -> None:
    runs.queued("run-1", 3)
    batch = [Settlement(done("a"), "run-1"), Settlement(done("b"), "run-1"),
             Settlement(failed("c"), "run-1", source="s3://b/c.jpg")]
    assert results.settle(batch) == [True, True, True]
    assert results.settle(batch) == [False, False, False]  # a second delivery
    progress = runs.progress("run-1")
    assert (progress.queued, progress.done, progress.failed) == (3, 2, 1)
    assert progress.failed_by_code == {"corrupt_image": 1}
    assert runs.failures("run-1") == [("c", "corrupt_image", "s3://b/c.jpg")]


def test_a_done_record_is_never_overwritten(results: ResultStore, runs: RunStore) -> None:
    results.settle([Settlement(done("a", row=1), "run-1")])
    assert results.settle([Settlement(failed("a"), "run-1"),
                           Settlement(done("a", row=2), "run-1")]) == [False, False]
    result = results.get("a")
    assert result is not None and result.status is Status.DONE and result.output is not None
    assert result.output.row == 1
    assert runs.progress("run-1").done == 1


def test_a_failed_job_done_later_in_its_run_moves_its_count(results: ResultStore,
                                                            runs: RunStore) -> None:
    results.settle([Settlement(failed("a", ErrorCode.POISON_MESSAGE), "run-1")])
    assert runs.progress("run-1").failed_by_code == {"poison_message": 1}
    assert results.settle([Settlement(done("a"), "run-1")]) == [True]
    progress = runs.progress("run-1")
    assert (progress.done, progress.failed, progress.failed_by_code) == (1, 0, {})
    assert [f[0] for f in runs.failures("run-1")] == ["a"]  # the list is history


def test_a_job_another_run_settled_first_counts_once_in_each(results: ResultStore,
                                                             runs: RunStore) -> None:
    results.settle([Settlement(done("a"), "run-1"), Settlement(failed("b"), "run-1")])
    for _ in range(2):
        assert results.settle([Settlement(done("a"), "run-2"),
                               Settlement(failed("b"), "run-2")]) == [False, False]
    first, second = runs.progress("run-1"), runs.progress("run-2")
    assert (first.done, first.failed) == (1, 1)
    assert (second.done, second.failed, second.failed_by_code) == (1, 1, {"corrupt_image": 1})


def test_one_batch_moves_several_runs_and_jobs_without_one(results: ResultStore,
                                                           runs: RunStore) -> None:
    results.settle([Settlement(done("a"), "run-1"), Settlement(done("b"), "run-2"),
                    Settlement(done("c")), Settlement(failed("d"), "run-2")])
    assert runs.progress("run-1").done == 1
    assert (runs.progress("run-2").done, runs.progress("run-2").failed) == (1, 1)


def test_claims_done_busy_and_taken_over(results: ResultStore) -> None:
    results.settle([Settlement(done("d"))])
    assert [c.state for c in results.claim(["d", "n"], "s1", lease_s=30)] == ["done", "new"]
    [busy] = results.claim(["n"], "s2", lease_s=30)
    assert busy.state == "busy" and busy.previous_shard == "s1" and busy.retry_after_s > 25
    assert results.claim(["n"], "s1", lease_s=30)[0].state == "new"  # its own claim
    time.sleep(0.05)
    [taken] = results.claim(["n"], "s2", lease_s=0.01)
    assert taken.state == "taken" and taken.previous_shard == "s1"
    assert results.still_held(["n", "d"], "s2") == [True, False]
    assert results.still_held(["n"], "s1") == [False]


def test_a_run_is_finished_once_listed_and_every_queued_job_settled(
        results: ResultStore, runs: RunStore) -> None:
    assert not runs.progress("run-1").exists
    runs.queued("run-1", 2, cursor="s3://b/p/001.jpg")
    results.settle([Settlement(done("a"), "run-1"), Settlement(done("b"), "run-1")])
    progress = runs.progress("run-1")
    assert progress.cursor == "s3://b/p/001.jpg" and not progress.finished
    runs.listed("run-1")
    assert runs.progress("run-1").finished
    assert runs.new_pass("run-1") == 1
    progress = runs.progress("run-1")
    assert (progress.queued, progress.done, progress.listed, progress.cursor) == (0, 0, False,
                                                                                  None)


def test_reads_of_many_jobs_are_chunked(results: ResultStore) -> None:
    ids = [f"j{i}" for i in range(5000)]
    results.settle([Settlement(done(job_id)) for job_id in ids[::2]])
    statuses = results.statuses(ids)
    assert statuses.count(Status.DONE) == 2500 and statuses.count(None) == 2500
