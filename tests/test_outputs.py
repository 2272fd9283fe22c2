"""Durable outputs: shards on a real HTTP S3 endpoint, claims in a real Redis.

These prove the idempotency protocol row by row: a job is written to exactly one committed
shard whether it is written twice in a row, by two writers at once, or after a writer died.
"""

from __future__ import annotations

import dataclasses
import io
import json
import threading
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import redis
from pydantic import ValidationError

import control.results
from control.objects import LocalOutputStore, S3OutputStore
from control.results import Reservation, ResultStore
from schemas.jobs import Job, Task
from schemas.keys import RedisKeys, ShardPaths
from schemas.outputs import MetadataRow, ShardManifest
from schemas.records import shard_id_of
from schemas.results import LabelScore, Status
from worker.outputs import METADATA_SCHEMA, OutputRow, ShardWriter, row_record

MODEL = "tiny/model"


def rows(n: int, start: int = 0) -> list[OutputRow]:
    rng = np.random.default_rng(start)
    out = []
    for i in range(start, start + n):
        job = Job(task=Task.IMAGE_EMBEDDING, model=MODEL, image=f"s3://src/{i}.jpg")
        vector = rng.normal(size=8).astype(np.float32)
        out.append(OutputRow(job, vector / np.linalg.norm(vector), f"etag{i}",
                             [LabelScore(label="cat", score=0.9)], False))
    return out


@pytest.fixture
def results(redis_url: str) -> ResultStore:
    return ResultStore(redis.Redis.from_url(redis_url), RedisKeys(), ttl_s=3600)


@pytest.fixture
def store(s3: Any, bucket: str) -> S3OutputStore:
    return S3OutputStore(f"s3://{bucket}/out", s3)


def committed_rows(store: S3OutputStore | LocalOutputStore) -> list[str]:
    """Every job id in every committed shard, as a reader of the layout sees it."""
    jobs: list[str] = []
    for key in store.list(ShardPaths(MODEL, "image").directory):
        if key.endswith(".json"):
            manifest = json.loads(store.get(key) or b"{}")
            jobs += manifest["jobs"]
            embeddings = np.load(io.BytesIO(store.get(key[:-5] + ".npy") or b""))
            table = pq.read_table(io.BytesIO(store.get(key[:-5] + ".parquet") or b""))
            assert embeddings.shape == (manifest["rows"], manifest["dim"])
            assert table.column("job_id").to_pylist() == manifest["jobs"]
    return jobs


def reserve_as(results: ResultStore, row: OutputRow, shard: str, lease_s: float) -> None:
    """Another writer's reservation of the row's job."""
    results.reserve([Reservation(row.job.job_id, row_record(row, shard, time.time()))], shard,
                    lease_s)


def uncommit(results: ResultStore, outcomes: list[Any]) -> None:
    """As if the writer died after its manifest, before committing the shard in Redis."""
    shard_ids = {shard_id_of(o.location.shard) for o in outcomes if o.location}
    results._redis.delete(*[RedisKeys().shard(shard_id) for shard_id in shard_ids])


def test_a_shard_holds_aligned_embeddings_metadata_and_a_manifest(store: S3OutputStore,
                                                                   results: ResultStore,
                                                                   s3: Any, bucket: str) -> None:
    batch = rows(5)
    outcomes = ShardWriter(store, results, worker="w", lease_s=30).write(batch, "image")
    assert [o.location.row for o in outcomes if o.location] == [0, 1, 2, 3, 4]
    shard_uri = outcomes[0].location.shard  # type: ignore[union-attr]
    key = shard_uri.split(f"s3://{bucket}/", 1)[1]
    array = np.load(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))
    np.testing.assert_allclose(array, np.stack([r.embedding for r in batch]))
    table = pq.read_table(io.BytesIO(
        s3.get_object(Bucket=bucket, Key=key[:-4] + ".parquet")["Body"].read()))
    assert table.column("source").to_pylist() == [r.job.source for r in batch]
    assert table.column("etag").to_pylist() == [r.etag for r in batch]
    assert table.column("labels").to_pylist() == [["cat"]] * 5
    assert sorted(committed_rows(store)) == sorted(r.job.job_id for r in batch)


def test_writing_a_done_job_again_adds_no_row(store: S3OutputStore, results: ResultStore) -> None:
    writer = ShardWriter(store, results, worker="w", lease_s=30)
    batch = rows(3)
    writer.write(batch, "image")
    again = writer.write(rows(3) + rows(1, start=10), "image")
    assert [o.already_done for o in again] == [True, True, True, False]
    assert len(committed_rows(store)) == 4


def test_a_live_reservation_makes_the_second_writer_wait(store: S3OutputStore,
                                                         results: ResultStore) -> None:
    batch = rows(2)
    reserve_as(results, batch[0], "other-shard", lease_s=30)
    outcomes = ShardWriter(store, results, worker="w", lease_s=30).write(batch, "image")
    assert outcomes[0].busy is not None and 0 < outcomes[0].busy.retry_after_s <= 30
    assert outcomes[1].location is not None
    assert committed_rows(store) == [batch[1].job.job_id]


def test_a_dead_writers_uncommitted_reservation_is_taken_over(store: S3OutputStore,
                                                              results: ResultStore) -> None:
    batch = rows(1)
    reserve_as(results, batch[0], "dead-shard", lease_s=0.01)
    time.sleep(0.05)
    outcomes = ShardWriter(store, results, worker="w", lease_s=0.01).write(batch, "image")
    assert outcomes[0].location is not None
    assert committed_rows(store) == [batch[0].job.job_id]


def test_a_dead_writers_committed_shard_is_recovered_not_rewritten(store: S3OutputStore,
                                                                   results: ResultStore) -> None:
    batch = rows(2)
    first = ShardWriter(store, results, worker="w", lease_s=0.01).write(batch, "image")
    uncommit(results, first)
    assert results.statuses([r.job.job_id for r in batch]) == [Status.RUNNING] * 2
    time.sleep(0.05)
    second = ShardWriter(store, results, worker="w2", lease_s=0.01).write(batch, "image")
    assert [o.location for o in second] == [o.location for o in first]
    assert len(committed_rows(store)) == 2
    assert results.statuses([r.job.job_id for r in batch]) == [Status.DONE] * 2


def test_a_recovered_row_is_reported_as_committed_not_as_recomputed(
        store: S3OutputStore, results: ResultStore) -> None:
    """The row a dead writer committed stands, and the job's result is that row (vector and
    labels), even where a recomputation differs in the last bits."""
    batch = rows(2)
    uncommit(results, ShardWriter(store, results, worker="w", lease_s=0.01).write(batch, "image"))
    time.sleep(0.05)
    recomputed = [dataclasses.replace(r, embedding=r.embedding + np.float32(6e-8))
                  for r in batch]
    second = ShardWriter(store, results, worker="w2", lease_s=0.01).write(recomputed, "image")
    for original, outcome in zip(batch, second, strict=True):
        assert outcome.committed is not None
        assert np.array_equal(outcome.committed.embedding, original.embedding)
        stored = [(s.label, np.float32(s.score)) for s in outcome.committed.labels or []]
        assert stored == [(s.label, np.float32(s.score)) for s in original.labels or []]
        assert outcome.committed.etag == original.etag


def test_local_directory_output_is_the_same_layout(tmp_path: Any, results: ResultStore) -> None:
    store = LocalOutputStore(tmp_path.as_uri())
    ShardWriter(store, results, worker="w", lease_s=30).write(rows(2), "image")
    assert len(committed_rows(store)) == 2
    assert not list(tmp_path.rglob(".tmp-*"))



def test_the_same_job_twice_in_one_batch_gets_one_row(store: S3OutputStore,
                                                      results: ResultStore) -> None:
    batch = rows(2)
    outcomes = ShardWriter(store, results, worker="w", lease_s=30).write(
        [batch[0], batch[1], batch[0]], "image")
    assert outcomes[0].location == outcomes[2].location
    assert sorted(committed_rows(store)) == sorted(r.job.job_id for r in batch)


MANIFEST = {"shard": "s1", "model": MODEL, "modality": "image", "rows": 2, "dim": 8,
            "embeddings": "s1.npy", "metadata": "s1.parquet", "jobs": ["a", "b"],
            "created_at": 1700000000.5, "writer": "vm-1234"}


def test_a_manifest_round_trips_through_its_model_as_the_same_json() -> None:
    manifest = ShardManifest.model_validate_json(json.dumps(MANIFEST))
    assert json.loads(manifest.model_dump_json()) == MANIFEST
    older = {k: v for k, v in MANIFEST.items() if k != "writer"}  # before manifests named it
    assert ShardManifest.model_validate_json(json.dumps(older)).writer is None
    assert ShardManifest.model_validate_json(manifest.model_dump_json()) == manifest
    assert (manifest.row_of("b"), manifest.row_of("c")) == (1, None)


@pytest.mark.parametrize("change", [{"rows": 3}, {"jobs": []}, {"priority": 1}, {"dim": 0}])
def test_a_manifest_that_does_not_describe_its_rows_is_refused(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ShardManifest.model_validate({**MANIFEST, **change})


def only(store: LocalOutputStore, modality: str, suffix: str) -> bytes:
    [key] = [k for k in store.list(ShardPaths(MODEL, modality).directory) if k.endswith(suffix)]
    return store.get(key) or b""


def test_a_written_shard_validates_against_the_manifest_and_row_models(
        tmp_path: Any, results: ResultStore) -> None:
    store = LocalOutputStore(tmp_path.as_uri())
    first, second, third = rows(3)
    batch = [first, second, OutputRow(third.job, third.embedding, None, None, False)]
    ShardWriter(store, results, worker="w", lease_s=30).write(batch, "image")
    manifest = ShardManifest.model_validate_json(only(store, "image", ".json"))
    assert (manifest.rows, manifest.dim, manifest.modality) == (3, 8, "image")
    table = pq.read_table(io.BytesIO(only(store, "image", ".parquet")))
    assert table.schema.equals(METADATA_SCHEMA)
    metadata = [MetadataRow.model_validate(row) for row in table.to_pylist()]
    assert [m.row for m in metadata] == [0, 1, 2]
    assert tuple(m.job_id for m in metadata) == manifest.jobs
    assert [m.etag for m in metadata] == ["etag0", "etag1", None]
    assert [m.labels for m in metadata] == [["cat"], ["cat"], []]
    assert np.load(io.BytesIO(only(store, "image", ".npy"))).shape == (manifest.rows, manifest.dim)


def test_every_shard_has_the_same_column_types_even_when_no_row_has_an_etag(
        tmp_path: Any, results: ResultStore) -> None:
    store = LocalOutputStore(tmp_path.as_uri())
    text = Job(task=Task.TEXT_EMBEDDING, model=MODEL, text="hello")
    row = OutputRow(text, rows(1)[0].embedding, None, None, True)
    ShardWriter(store, results, worker="w", lease_s=30).write([row], "text")
    table = pq.read_table(io.BytesIO(only(store, "text", ".parquet")))
    assert table.schema.equals(METADATA_SCHEMA)
    [metadata] = [MetadataRow.model_validate(r) for r in table.to_pylist()]
    assert metadata.task is Task.TEXT_EMBEDDING and metadata.text_truncated
    assert metadata.etag is None and metadata.labels == metadata.scores == []


def test_the_check_before_a_commit_renews_the_reservations_it_finds_held(
        results: ResultStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest's write then has a whole lease to land in before another writer may take
    the job over (a write that outlasts a lease could otherwise commit a second row). Leases
    are judged by the clock the clients send, so the test moves that clock: no sleep can make
    it late on a slow machine."""
    clock = [time.time()]
    monkeypatch.setattr(control.results, "time", SimpleNamespace(time=lambda: clock[0]))
    start = clock[0]
    [row] = rows(1)
    results.reserve([Reservation(row.job.job_id, row_record(row, "shard-a", start))],
                    "shard-a", lease_s=0.4)
    clock[0] = start + 0.3
    assert results.still_held([row.job.job_id], "shard-a") == [True]
    clock[0] = start + 0.6  # past the first lease, 0.3 s into the renewed one
    [claim] = results.reserve([Reservation(row.job.job_id, row_record(row, "shard-b", 0))],
                              "shard-b", lease_s=0.4)
    assert claim.state == "busy" and claim.previous_shard == "shard-a"
    clock[0] = start + 1.1  # the renewed lease is over too
    [claim] = results.reserve([Reservation(row.job.job_id, row_record(row, "shard-b", 0))],
                              "shard-b", lease_s=0.4)
    assert claim.state == "taken"


class _StalledManifests(S3OutputStore):
    """An S3 store whose manifest writes wait for `go`: a writer stalled past its lease."""

    def __init__(self, root: str, s3: Any) -> None:
        super().__init__(root, s3)
        self.stalled = threading.Event()
        self.go = threading.Event()

    def put(self, key: str, data: bytes) -> None:
        if key.endswith(".json") and not self.go.is_set():
            self.stalled.set()
            self.go.wait(10)
        super().put(key, data)


def test_a_writer_stalled_past_its_lease_never_commits_a_second_row(
        s3: Any, bucket: str, results: ResultStore) -> None:
    """Its rows were taken over while its manifest was on the way: its commit is refused,
    its manifest deleted, and a later writer does not take that shard for committed."""
    batch = rows(3)
    slow_store = _StalledManifests(f"s3://{bucket}/out", s3)
    slow = ShardWriter(slow_store, results, worker="slow", lease_s=0.2)
    outcome: list[Any] = []
    thread = threading.Thread(target=lambda: outcome.extend(slow.write(batch[:2], "image")))
    thread.start()
    assert slow_store.stalled.wait(10)
    time.sleep(0.3)  # past the slow writer's lease
    store = S3OutputStore(f"s3://{bucket}/out", s3)
    taker = ShardWriter(store, results, worker="taker", lease_s=0.2).write(batch[:1], "image")
    assert taker[0].location is not None
    slow_store.go.set()
    thread.join(10)
    assert [o.busy is not None for o in outcome] == [True, True]
    assert sorted(committed_rows(store)) == [batch[0].job.job_id]
    # The row the taker left stands; the other goes to whoever writes it next.
    [status_0, status_1] = results.statuses([r.job.job_id for r in batch[:2]])
    assert (status_0, status_1) == (Status.DONE, None)
    again = ShardWriter(store, results, worker="w", lease_s=0.2).write(batch, "image")
    assert [o.already_done for o in again] == [True, False, False]
    assert sorted(committed_rows(store)) == sorted(r.job.job_id for r in batch)


def test_a_revoked_shards_leftover_manifest_is_not_taken_for_committed(
        store: S3OutputStore, results: ResultStore) -> None:
    """A writer revoked after writing its manifest, which died before deleting it."""
    batch = rows(2)
    first = ShardWriter(store, results, worker="w", lease_s=0.05).write(batch, "image")
    shard = shard_id_of(first[0].location.shard)  # type: ignore[union-attr]
    uncommit(results, first)
    results._redis.set(RedisKeys().shard(shard), "")  # revoked, as a takeover leaves it
    time.sleep(0.1)
    second = ShardWriter(store, results, worker="w2", lease_s=0.05).write(batch, "image")
    assert all(o.location is not None and shard_id_of(o.location.shard) != shard
               for o in second)
