"""Records, claims and run counters against a real redis-server (control/results.py)."""

from __future__ import annotations

import json
import time

import pytest
import redis

from control.publish import _PUBLISH as PUBLISH_SCRIPT
from control.publish import RunCount, TaskPublisher
from control.results import Claim, Commit, Reservation, ResultStore, RunStore, Settlement
from schemas.errors import ErrorCode
from schemas.keys import RedisKeys
from schemas.records import encode_done, record_status
from schemas.results import ErrorInfo, JobResult, LabelScore, OutputLocation, Status
from schemas.settings import Settings

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


LABELS = [LabelScore(label="cat", score=0.75)]


def record(job_id: str, shard: str, run_id: str | None = None) -> Reservation:
    return Reservation(job_id, encode_done(
        run_id=run_id, finished_at=time.time(), attempts=1, dim=4, shard=shard, row=0,
        labels=LABELS, truncated=False, embedding=None), run_id)


def write(results: ResultStore, job_ids: list[str], run_id: str | None = None,
          shard: str = "261130133240-0123456789") -> list[Claim]:
    """What a shard writer does: reserve, (write the shard,) commit."""
    claims = results.reserve([record(j, shard, run_id) for j in job_ids], shard, lease_s=30)
    results.commit(shard, SHARD)
    return claims


def queue(client: redis.Redis, run_id: str, count: int, cursor: str | None = None) -> None:
    """What a producer's publish adds to its run (control/publish.py), without messages."""
    settings = Settings(redis_url="redis://unused", model="m", key_prefix=KEYS.prefix)
    TaskPublisher(client, settings).publish([], RunCount(run_id, count, cursor))


def enqueue(client: redis.Redis, job_ids: list[str], resend: bool = False) -> list[bool]:
    """Submit each job alone, as `Client.submit_many` does; whether its message was sent."""
    settings = Settings(redis_url="redis://unused", model="m", key_prefix=KEYS.prefix)
    client.delete("t-queue")
    TaskPublisher(client, settings).publish(
        [("t-queue", {"jobs": [job_id]}) for job_id in job_ids],
        records=[[job_id] for job_id in job_ids], resend=resend)
    sent = {json.loads(json.loads(raw)["body"])[0][0]["jobs"][0]
            for raw in client.lrange("t-queue", 0, -1)}
    return [job_id in sent for job_id in job_ids]


def failed(job_id: str, code: ErrorCode = ErrorCode.CORRUPT_IMAGE) -> JobResult:
    return JobResult(job_id=job_id, status=Status.FAILED, attempts=1,
                     error=ErrorInfo(code=code, message="broken"))


def test_a_single_submission_is_queued_once(results: ResultStore, client: redis.Redis) -> None:
    assert enqueue(client, ["j1", "j2"]) == [True, True]
    assert enqueue(client, ["j1"]) == [False]
    assert results.statuses(["j1", "j2", "j3"]) == [Status.QUEUED, Status.QUEUED, None]


def test_a_done_job_is_not_queued_again_a_failed_one_is(results: ResultStore,
                                                        client: redis.Redis) -> None:
    write(results, ["ok"])
    results.fail([Settlement(failed("bad"))])
    assert enqueue(client, ["ok", "bad"]) == [False, True]
    assert results.statuses(["ok", "bad"]) == [Status.DONE, Status.QUEUED]
    assert enqueue(client, ["ok"], resend=True) == [True]
    assert results.statuses(["ok"]) == [Status.DONE]  # never set back


def test_rows_are_numbered_as_won_and_read_as_done_once_the_shard_is_committed(
        results: ResultStore, client: redis.Redis) -> None:
    shard = "261130133240-0123456789"
    results.reserve([record("x", "other")], "other", lease_s=30)
    claims = results.reserve([record(j, shard) for j in ["a", "x", "b"]], shard, lease_s=30)
    assert [(c.state, c.row) for c in claims] == [("new", 0), ("busy", None), ("new", 1)]
    assert results.statuses(["a", "b"]) == [Status.RUNNING] * 2
    assert enqueue(client, ["a"]) == [False]  # being written: not sent again
    assert results.commit(shard, SHARD) is Commit.COMMITTED
    assert results.commit(shard, SHARD) is Commit.ALREADY
    [a, b] = ResultStore(client, KEYS, ttl_s=3600).get_many(["a", "b"])
    assert a is not None and a.status is Status.DONE
    assert a.output == OutputLocation(shard=SHARD, row=0) and a.labels == LABELS
    assert b is not None and b.output == OutputLocation(shard=SHARD, row=1)
    assert 3590 <= client.ttl(KEYS.record("a")) <= 3600


def test_a_run_counts_a_job_when_its_shard_commits_once(results: ResultStore,
                                                        runs: RunStore,
                                                        client: redis.Redis) -> None:
    queue(client, "run-1", 3)
    shard = "s-1"
    results.reserve([record(j, shard, "run-1") for j in ["a", "b"]], shard, lease_s=30)
    assert runs.progress("run-1").done == 0  # reserved, not committed
    results.commit(shard, SHARD)
    results.commit(shard, SHARD)  # a recovering writer commits it again: no-op
    write(results, ["a", "b"], "run-1", shard="s-2")  # a second delivery: already done
    results.fail([Settlement(failed("c"), "run-1", source="s3://b/c.jpg")])
    results.fail([Settlement(failed("c"), "run-1", source="s3://b/c.jpg")])
    progress = runs.progress("run-1")
    assert (progress.queued, progress.done, progress.failed) == (3, 2, 1)
    assert progress.failed_by_code == {"corrupt_image": 1}
    assert runs.failures("run-1") == [("c", "corrupt_image", "s3://b/c.jpg")]


def test_a_shard_given_up_counts_nothing(results: ResultStore, runs: RunStore) -> None:
    results.reserve([record("a", "s-1", "run-1")], "s-1", lease_s=30)
    results.release(["a"], "s-1")
    assert results.statuses(["a"]) == [None]
    write(results, ["a"], "run-1", shard="s-2")
    assert runs.progress("run-1").done == 1


def test_a_done_job_is_never_failed_nor_written_again(results: ResultStore,
                                                      runs: RunStore) -> None:
    write(results, ["a"], "run-1")
    assert results.fail([Settlement(failed("a"), "run-1")]) == [False]
    assert [c.state for c in write(results, ["a"], "run-1", shard="s-9")] == ["done"]
    result = results.get("a")
    assert result is not None and result.status is Status.DONE
    assert (runs.progress("run-1").done, runs.progress("run-1").failed) == (1, 0)


def test_a_failed_job_done_later_in_its_run_moves_its_count(results: ResultStore,
                                                            runs: RunStore) -> None:
    results.fail([Settlement(failed("a", ErrorCode.POISON_MESSAGE), "run-1")])
    assert runs.progress("run-1").failed_by_code == {"poison_message": 1}
    assert [c.state for c in write(results, ["a"], "run-1")] == ["new"]
    progress = runs.progress("run-1")
    assert (progress.done, progress.failed, progress.failed_by_code) == (1, 0, {})
    assert [f[0] for f in runs.failures("run-1")] == ["a"]  # the list is history


def test_a_job_another_run_settled_first_counts_once_in_each(results: ResultStore,
                                                             runs: RunStore) -> None:
    write(results, ["a"], "run-1")
    results.fail([Settlement(failed("b"), "run-1")])
    for n in range(2):
        assert [c.state for c in write(results, ["a"], "run-2", shard=f"s-{n}")] == ["done"]
        assert results.fail([Settlement(failed("b"), "run-2")]) == [False]
    first, second = runs.progress("run-1"), runs.progress("run-2")
    assert (first.done, first.failed) == (1, 1)
    assert (second.done, second.failed, second.failed_by_code) == (1, 1, {"corrupt_image": 1})


def test_one_shard_moves_several_runs_and_jobs_without_one(results: ResultStore,
                                                           runs: RunStore) -> None:
    results.reserve([record("a", "s", "run-1"), record("b", "s", "run-2"), record("c", "s")],
                    "s", lease_s=30)
    results.commit("s", SHARD)
    assert (runs.progress("run-1").done, runs.progress("run-2").done) == (1, 1)


def test_an_expired_reservation_is_taken_over_only_when_asked(results: ResultStore) -> None:
    results.reserve([record("n", "s1")], "s1", lease_s=30)
    assert results.reserve([record("n", "s1")], "s1", lease_s=30)[0].state == "new"  # its own
    time.sleep(0.05)
    [taken] = results.reserve([record("n", "s2")], "s2", lease_s=0.01)
    assert taken.state == "taken" and taken.previous_shard == "s1"
    [again] = results.reserve([record("n", "s2")], "s2", lease_s=0.01, first_row=7,
                              takeover=True)
    assert (again.state, again.row) == ("new", 7)
    assert results.still_held(["n"], "s2") == [True]
    assert results.still_held(["n"], "s1") == [False]
    assert results.commit("s1", SHARD) is Commit.REVOKED  # s1's writer was only slow
    assert results.statuses(["n"]) == [Status.RUNNING]
    assert results.commit("s2", SHARD) is Commit.COMMITTED


def test_a_run_is_finished_once_listed_and_every_queued_job_settled(
        results: ResultStore, runs: RunStore, client: redis.Redis) -> None:
    assert not runs.progress("run-1").exists
    queue(client, "run-1", 2, cursor="s3://b/p/001.jpg")
    write(results, ["a", "b"], "run-1")
    progress = runs.progress("run-1")
    assert progress.cursor == "s3://b/p/001.jpg" and not progress.finished
    runs.listed("run-1")
    assert runs.progress("run-1").finished
    assert runs.new_pass("run-1") == 1
    progress = runs.progress("run-1")  # the counters go on over passes
    assert (progress.queued, progress.done, progress.listed, progress.cursor) == (2, 2, False,
                                                                                  None)


def test_reads_of_many_jobs_are_chunked(results: ResultStore) -> None:
    ids = [f"j{i}" for i in range(5000)]
    write(results, ids[::2])
    statuses = results.statuses(ids)
    assert statuses.count(Status.DONE) == 2500 and statuses.count(None) == 2500
    assert [record_status(raw) for raw in results.records(ids[:2])] == [Status.DONE, None]


def test_a_reservation_sent_twice_counts_once_and_keeps_its_rows(results: ResultStore,
                                                                 runs: RunStore) -> None:
    """redis-py sends a script again when its reply was lost."""
    batch = [record(j, "s", "run-1") for j in ["a", "b"]]
    first = results.reserve(batch, "s", lease_s=30)
    again = results.reserve(batch, "s", lease_s=30)
    assert [c.row for c in again] == [c.row for c in first] == [0, 1]
    results.commit("s", SHARD)
    assert runs.progress("run-1").done == 2


def _scripts_run(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def test_a_bulk_batch_of_new_jobs_is_reserved_without_a_script(results: ResultStore,
                                                               runs: RunStore,
                                                               client: redis.Redis) -> None:
    before = _scripts_run(client)
    claims = results.reserve([record(j, "s-fast", "run-f") for j in ["a", "b", "c"]], "s-fast",
                             lease_s=30)
    assert _scripts_run(client) == before  # plain commands, one pipelined round trip
    assert [(c.state, c.row) for c in claims] == [("new", 0), ("new", 1), ("new", 2)]
    assert runs.progress("run-f").done == 0  # counted at commit, not before
    results.commit("s-fast", SHARD)
    assert runs.progress("run-f").done == 3
    assert [r.output.row for r in results.get_many(["a", "b", "c"])  # type: ignore[union-attr]
            ] == [0, 1, 2]


def test_a_bulk_batch_with_a_settled_or_busy_job_is_renumbered_and_counted_by_the_script(
        results: ResultStore, runs: RunStore, client: redis.Redis) -> None:
    """The pipelined rows assume every row is won: a job done by another run and one being
    written elsewhere leave no gap in the shard's rows and are not counted as won."""
    write(results, ["x"], "run-other", shard="s-old")
    results.reserve([record("y", "s-live", "run-other")], "s-live", lease_s=30)
    shard = "s-mixed"
    claims = results.reserve([record(j, shard, "run-m") for j in ["a", "x", "y", "b"]], shard,
                             lease_s=30)
    assert [(c.state, c.row) for c in claims] == [("new", 0), ("done", None),
                                                  ("busy", None), ("new", 1)]
    results.commit(shard, SHARD)
    progress = runs.progress("run-m")
    assert progress.done == 3  # a, b, and x once (settled by another run)
    [a, b] = results.get_many(["a", "b"])
    assert a is not None and b is not None
    assert (a.output, b.output) == (OutputLocation(shard=SHARD, row=0),
                                    OutputLocation(shard=SHARD, row=1))


def test_a_lost_reply_to_the_pipelined_reservation_changes_nothing(results: ResultStore,
                                                                   runs: RunStore) -> None:
    """redis-py sends a pipeline again when its reply was lost: the second finds the rows
    this shard holds, and the script numbers and counts them once."""
    batch = [record(j, "s-again", "run-a") for j in ["a", "b"]]
    results.reserve(batch, "s-again", lease_s=30)
    again = results.reserve(batch, "s-again", lease_s=30)
    assert [(c.state, c.row) for c in again] == [("new", 0), ("new", 1)]
    results.commit("s-again", SHARD)
    assert runs.progress("run-a").done == 2


def test_a_message_is_sent_if_any_of_its_single_submissions_is_new(
        results: ResultStore, client: redis.Redis) -> None:
    settings = Settings(redis_url="redis://unused", model="m", key_prefix=KEYS.prefix)
    assert enqueue(client, ["old"]) == [True]
    TaskPublisher(client, settings).publish([("t-queue", {"jobs": ["old", "new"]})],
                                            records=[["old", "new"]])
    assert client.llen("t-queue") == 2
    assert results.statuses(["old", "new"]) == [Status.QUEUED] * 2


def test_a_retried_failure_gives_way_at_reservation_even_if_that_shard_dies(
        results: ResultStore, runs: RunStore) -> None:
    results.fail([Settlement(failed("a"), "run-1")])
    results.reserve([record("a", "s1", "run-1")], "s1", lease_s=30)
    assert (runs.progress("run-1").failed, runs.progress("run-1").done) == (0, 0)
    results.release(["a"], "s1")  # its write failed
    results.fail([Settlement(failed("a"), "run-1")])
    progress = runs.progress("run-1")
    assert (progress.failed, progress.done, progress.failed_by_code) == (
        1, 0, {"corrupt_image": 1})


def test_a_job_failed_by_another_run_then_done_here_counts_once(results: ResultStore,
                                                                runs: RunStore) -> None:
    results.fail([Settlement(failed("a"), "run-1")])
    results.fail([Settlement(failed("a"), "run-2")])  # counted in run-2 as a repeat
    assert runs.progress("run-2").failed == 1
    write(results, ["a"], "run-2")
    progress = runs.progress("run-2")
    assert (progress.failed, progress.done) == (0, 1), progress


def test_jobs_another_run_settled_found_outside_a_reservation_count_once(
        results: ResultStore, runs: RunStore) -> None:
    write(results, ["a"], "run-1")
    results.fail([Settlement(failed("b"), "run-1")])
    for _ in range(2):
        results.count_repeats(["a", "b", "nothing"], "run-2")
    assert results.count_repeats(["a", "b"], "run-1") == 0  # its own
    progress = runs.progress("run-2")
    assert (progress.done, progress.failed) == (1, 1)


def test_a_dead_writers_reservation_gives_way_to_a_failure(results: ResultStore,
                                                          runs: RunStore) -> None:
    results.reserve([record("a", "dead", "run-1")], "dead", lease_s=30)
    assert results.fail([Settlement(failed("a"), "run-1")]) == [False]  # the writer may live
    stale = ResultStore(results._redis, KEYS, ttl_s=3600, lease_s=0.01)
    time.sleep(0.05)
    assert stale.fail([Settlement(failed("a"), "run-1")]) == [True]
    assert results.statuses(["a"]) == [Status.FAILED]
    assert results.commit("dead", SHARD) is Commit.REVOKED  # it was only slow: too late
    assert (runs.progress("run-1").done, runs.progress("run-1").failed) == (0, 1)


def test_a_publish_sent_twice_pushes_and_counts_once(client: redis.Redis) -> None:
    script = client.register_script(PUBLISH_SCRIPT)
    keys = [KEYS.publish_token("t1"), KEYS.run("run-1"), "queue-a", "queue-a"]
    for _ in range(2):
        script(keys=[*keys, KEYS.record("j")],
               args=[2, "s3://b/2.jpg", 60, 3600, 0, "call-1", b"m1", 0, b"m2", 1])
    assert client.lrange("queue-a", 0, -1) == [b"m2", b"m1"]
    assert client.hgetall(KEYS.run("run-1")) == {b"queued": b"2", b"cursor": b"s3://b/2.jpg"}
    assert client.get(KEYS.record("j")) == b"qcall-1"
