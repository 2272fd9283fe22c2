"""Durable outputs: one shard per flushed batch and modality, committed by its manifest.

A shard is three objects written in order: embeddings (`.npy`), row-aligned metadata
(`.parquet`, one `MetadataRow` per row), then the manifest (`.json`, a `ShardManifest`; both
models are in `schemas/outputs.py`). Readers take only shards that have a manifest. Each
row is reserved in Redis before it is written, with the job's whole record, and the shard is
committed in Redis after its manifest (control/results.py), so a job redelivered after a
crash, or run on two workers at once, ends up in exactly one committed shard, and its result
is that row's.
"""

from __future__ import annotations

import io
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from control.objects import OutputStore
from control.results import Claim, Commit, Reservation, ResultStore
from schemas.errors import JobBusy
from schemas.jobs import Job
from schemas.keys import ShardPaths
from schemas.outputs import METADATA_COLUMNS, ColumnType, MetadataRow, ShardManifest
from schemas.records import encode_done
from schemas.results import LabelScore, OutputLocation

log = logging.getLogger(__name__)

_ARROW_TYPES: dict[ColumnType, pa.DataType] = {
    ColumnType.INT32: pa.int32(),
    ColumnType.STRING: pa.string(),
    ColumnType.BOOL: pa.bool_(),
    ColumnType.STRING_LIST: pa.list_(pa.string()),
    ColumnType.FLOAT32_LIST: pa.list_(pa.float32()),
}
METADATA_SCHEMA = pa.schema([(name, _ARROW_TYPES[kind])
                             for name, kind in METADATA_COLUMNS.items()])


@dataclass(frozen=True)
class OutputRow:
    job: Job
    embedding: np.ndarray
    etag: str | None
    labels: list[LabelScore] | None
    text_truncated: bool
    run_id: str | None = None  # the run whose counters the job moves
    attempts: int = 1


def row_record(row: OutputRow, shard: str, finished_at: float) -> bytes:
    """The record a row's job leaves in Redis (schemas/records.py), its row number left for
    the reservation to fill in."""
    keep = row.job.return_embedding
    dtype = row.job.embedding_dtype
    return encode_done(
        run_id=row.run_id, finished_at=finished_at, attempts=row.attempts,
        dim=int(row.embedding.shape[-1]), shard=shard, row=0, labels=row.labels,
        truncated=row.text_truncated,
        embedding=row.embedding.astype("<f2" if dtype == "float16" else "<f4").tobytes()
        if keep else None, dtype=dtype)


@dataclass(frozen=True)
class _CommittedShard:
    manifest: ShardManifest
    uri: str
    vectors: np.ndarray | None
    rows: list[MetadataRow]

    def outcome(self, job: Job) -> RowOutcome | None:
        """Where `job`'s row stands in this shard, with the row as committed; None if absent."""
        row = self.manifest.row_of(job.job_id)
        if row is None:
            return None
        return RowOutcome(location=OutputLocation(shard=self.uri, row=row),
                          committed=self._output_row(job, row))

    def _output_row(self, job: Job, row: int) -> OutputRow | None:
        if self.vectors is None or row >= len(self.rows):
            return None
        meta = self.rows[row]
        labels = [LabelScore(label=label, score=score)
                  for label, score in zip(meta.labels, meta.scores, strict=True)]
        return OutputRow(job, self.vectors[row], meta.etag,
                         labels if labels or job.zero_shot is not None else None,
                         meta.text_truncated)


@dataclass(frozen=True)
class RowOutcome:
    """Where a row ended up: written now, already written earlier, or held by another writer."""

    location: OutputLocation | None = None
    already_done: bool = False
    busy: JobBusy | None = None
    # A row a dead writer had committed: its result is this row, not the one computed now
    # (a recomputed vector may differ in the last bits).
    committed: OutputRow | None = None


# A shard whose data is written within this share of the lease after its claim commits
# without checking the claim; a slower one checks and renews it first.
FRESH_CLAIM_SHARE = 0.25

def new_shard_id() -> str:
    """16 characters, since every job's record names its shard: the time in milliseconds then
    41 random bits, both base 36, so that names sort by time and never collide in practice.
    The writer and the time in words are in the manifest."""
    return _base36(time.time_ns() // 1_000_000).rjust(8, "0") + _base36(
        secrets.randbits(41)).rjust(8, "0")


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while number:
        number, digit = divmod(number, 36)
        out = digits[digit] + out
    return out or "0"


def _metadata_row(row: int, output: OutputRow) -> MetadataRow:
    labels = output.labels or []
    return MetadataRow(row=row, job_id=output.job.job_id, source=output.job.source,
                       etag=output.etag, version=output.job.version, task=output.job.task,
                       model=output.job.model,
                       labels=[s.label for s in labels], scores=[s.score for s in labels],
                       text_truncated=output.text_truncated, run_id=output.run_id)


def _metadata_table(rows: Sequence[OutputRow]) -> pa.Table:
    return pa.Table.from_pylist([_metadata_row(i, r).model_dump(mode="json")
                                 for i, r in enumerate(rows)], schema=METADATA_SCHEMA)


def _manifest(paths: ShardPaths, shard: str, rows: Sequence[OutputRow],
              writer: str) -> ShardManifest:
    return ShardManifest(
        shard=shard,
        model=rows[0].job.model,
        modality=paths.modality,
        rows=len(rows),
        dim=int(rows[0].embedding.shape[-1]),
        embeddings=paths.embeddings(shard).rsplit("/", 1)[-1],
        metadata=paths.metadata(shard).rsplit("/", 1)[-1],
        jobs=tuple(r.job.job_id for r in rows),
        created_at=time.time(),
        writer=writer,
    )


def _npy_bytes(rows: Sequence[OutputRow]) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.stack([r.embedding for r in rows]).astype(np.float32), allow_pickle=False)
    return buffer.getvalue()


def _parquet_bytes(rows: Sequence[OutputRow]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(_metadata_table(rows), buffer)
    return buffer.getvalue()


class ShardWriter:
    def __init__(self, store: OutputStore, results: ResultStore, *, worker: str,
                 lease_s: float) -> None:
        self._store = store
        self._results = results
        self._worker = worker
        self._lease_s = lease_s

    def write(self, rows: Sequence[OutputRow], modality: str) -> list[RowOutcome]:
        """Claim, write and commit one shard; one outcome per row, in order.

        The same job twice in one batch (two deliveries flushed together) gets one row.
        """
        first_of: dict[str, int] = {}
        for i, row in enumerate(rows):
            first_of.setdefault(row.job.job_id, i)
        unique = [rows[i] for i in first_of.values()]
        outcomes = dict(zip(first_of, self._write_unique(unique, modality), strict=True))
        for run_id in {row.run_id for row in rows} - {None}:
            # A copy from another run than the one whose copy was written counts there too.
            copies = [row.job.job_id for i, row in enumerate(rows)
                      if row.run_id == run_id and first_of[row.job.job_id] != i
                      and rows[first_of[row.job.job_id]].run_id != run_id]
            self._results.count_repeats(copies, run_id)
        return [outcomes[row.job.job_id] for row in rows]

    def _write_unique(self, rows: Sequence[OutputRow], modality: str) -> list[RowOutcome]:
        if not rows:
            return []
        paths = ShardPaths(rows[0].job.model, modality)
        shard = new_shard_id()
        now = time.time()
        wanted = [Reservation(r.job.job_id, row_record(r, shard, now), r.run_id) for r in rows]
        claims = self._results.reserve(wanted, shard, self._lease_s)
        claimed_at = time.monotonic()
        outcomes: list[RowOutcome | None] = [None] * len(rows)
        row_of: dict[int, int] = {}
        stale: list[int] = []
        dead_shards: dict[str, _CommittedShard | None] = {}
        for i, (row, claim) in enumerate(zip(rows, claims, strict=True)):
            if claim.state == "taken" and claim.previous_shard:
                outcome = self._from_dead_shard(paths, claim.previous_shard, row, dead_shards)
                if outcome is None:
                    stale.append(i)
                outcomes[i] = outcome
            else:
                outcomes[i] = self._outcome(row, claim, i, row_of)
        if stale:
            # Their writers died before committing: this shard writes them.
            again = self._results.reserve([wanted[i] for i in stale], shard, self._lease_s,
                                          first_row=len(row_of), takeover=True)
            for i, claim in zip(stale, again, strict=True):
                outcomes[i] = self._outcome(rows[i], claim, i, row_of)
        order = sorted(row_of, key=row_of.__getitem__)
        for i, outcome in zip(order, self._commit(paths, shard, [rows[i] for i in order],
                                                  claimed_at), strict=True):
            outcomes[i] = outcome
        return [o if o is not None else RowOutcome() for o in outcomes]

    @staticmethod
    def _outcome(row: OutputRow, claim: Claim, index: int,
                 row_of: dict[int, int]) -> RowOutcome | None:
        """None for a row this shard won (numbered in `row_of`), else where the job stands."""
        if claim.state == "new" and claim.row is not None:
            row_of[index] = claim.row
            return None
        if claim.state == "done":
            return RowOutcome(already_done=True)
        return RowOutcome(busy=JobBusy(
            f"job {row.job.job_id} is being written by shard {claim.previous_shard}",
            retry_after_s=claim.retry_after_s or 1.0))

    def _from_dead_shard(self, paths: ShardPaths, shard: str, row: OutputRow,
                         cache: dict[str, _CommittedShard | None]) -> RowOutcome | None:
        """The job's row in a dead writer's shard, if that shard was committed (then it is
        committed in Redis too, once); None if it was not."""
        if shard not in cache:
            cache[shard] = self._committed_shard(paths, shard)
            uri = self._store.uri(paths.embeddings(shard))
            if cache[shard] is not None and self._results.commit(shard, uri) is Commit.REVOKED:
                # Its writer lost a row after its lease and wrote the manifest anyway.
                cache[shard] = None
        committed = cache[shard]
        return committed.outcome(row.job) if committed is not None else None

    def _committed_shard(self, paths: ShardPaths, shard: str) -> _CommittedShard | None:
        """A dead writer's shard, read once per write: None unless it was committed (then its
        rows stand and are not rewritten)."""
        raw = self._store.get(paths.manifest(shard))
        if raw is None:
            return None
        try:
            vectors = np.load(io.BytesIO(self._store.get(paths.embeddings(shard)) or b""),
                              allow_pickle=False)
            table = pq.read_table(io.BytesIO(self._store.get(paths.metadata(shard)) or b""))
            rows = [MetadataRow.model_validate(row) for row in table.to_pylist()]
        except Exception:
            log.warning("committed shard %s could not be read back", shard, exc_info=True)
            vectors, rows = None, []
        return _CommittedShard(ShardManifest.model_validate_json(raw),
                               self._store.uri(paths.embeddings(shard)), vectors, rows)

    def _commit(self, paths: ShardPaths, shard: str, rows: Sequence[OutputRow],
                claimed_at: float) -> list[RowOutcome]:
        """Write the rows (in their reserved order), then the manifest, then commit the shard
        in Redis. A shard that cannot be written gives its reservations back at once."""
        if not rows:
            return []
        job_ids = [r.job.job_id for r in rows]
        try:
            self._store.put(paths.embeddings(shard), _npy_bytes(rows))
            self._store.put(paths.metadata(shard), _parquet_bytes(rows))
            if time.monotonic() - claimed_at < self._lease_s * FRESH_CLAIM_SHARE:
                # No other writer takes a reservation before its whole lease, and the
                # manifest still has most of one to land in: no round trip to check.
                held = [True] * len(rows)
            else:
                held = self._results.still_held(job_ids, shard)
            if not all(held):
                # The lease ran out and another writer took some rows; their row numbers are
                # in the records, so the shard is not rewritten without them: it is dropped.
                self._results.release(job_ids, shard)
                lost = JobBusy("reservation lost to another writer", retry_after_s=1.0)
                return [RowOutcome(busy=lost) for _ in rows]
            manifest = _manifest(paths, shard, rows, self._worker)
            self._store.put(paths.manifest(shard), manifest.model_dump_json().encode())
        except BaseException:
            self._release_quietly(job_ids, shard)
            raise
        uri = self._store.uri(paths.embeddings(shard))
        if self._results.commit(shard, uri) is Commit.REVOKED:
            # Stalled past the lease after the check above: a row was taken over or failed
            # meanwhile, so the shard never counts; what it still holds goes back.
            self._release_quietly(job_ids, shard)
            self._delete_quietly(paths.manifest(shard))
            lost = JobBusy("reservation lost to another writer", retry_after_s=1.0)
            return [RowOutcome(busy=lost) for _ in rows]
        return [RowOutcome(location=OutputLocation(shard=uri, row=i)) for i in range(len(rows))]

    def _delete_quietly(self, key: str) -> None:
        """A revoked shard's manifest goes, so no reader takes its rows for committed ones
        (Redis says revoked anyway, while the shard's key lasts)."""
        try:
            self._store.delete(key)
        except Exception:
            log.warning("could not delete the revoked manifest %s", key, exc_info=True)

    def _release_quietly(self, job_ids: list[str], shard: str) -> None:
        try:
            self._results.release(job_ids, shard)
        except Exception:
            log.warning("could not release the reservations of shard %s", shard, exc_info=True)
