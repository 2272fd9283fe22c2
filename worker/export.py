"""`dualstream export RUN`: a run's committed rows as consolidated, deduplicated shards that
embedding_reader and autofaiss read as they are.

The output root holds one small shard per flushed batch, with uncommitted leftovers of writers
that died (data without a manifest) and, rarely, a job in two shards (`--force`). An export reads
every manifest under the root (committed shards only: a shard Redis marks revoked is skipped
too), keeps the rows of the run, one per job (the newest shard's), and writes them in files of
`rows_per_file` rows:

    <to>/<modality>/embeddings/emb_00000.npy     float32 [rows, dim], L2-normalised
    <to>/<modality>/metadata/metadata_00000.parquet   row-aligned: job_id, source, image_path
                                                      (images) or caption (texts), labels,
                                                      scores, model, etag, version, run_id

which is embedding_reader's `parquet_npy` layout (`EmbeddingReader(<to>/image/embeddings,
metadata_folder=<to>/image/metadata, file_format="parquet_npy", meta_columns=[...])`) and
autofaiss's `build_index(embeddings=<to>/image/embeddings)`.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis

from control.objects import OutputStore
from schemas.keys import RedisKeys
from schemas.outputs import ShardManifest

log = logging.getLogger(__name__)

ROWS_PER_FILE = 100_000


@dataclass(frozen=True)
class ExportSummary:
    rows: dict[str, int]  # per modality
    files: dict[str, int]
    shards_read: int
    duplicates_dropped: int
    skipped_shards: int  # revoked, or unreadable

    def as_dict(self) -> dict[str, object]:
        return {"rows": self.rows, "files": self.files, "shards_read": self.shards_read,
                "duplicates_dropped": self.duplicates_dropped,
                "skipped_shards": self.skipped_shards}


@dataclass
class _Row:
    shard: str
    vector: np.ndarray
    metadata: dict[str, object]


def export_run(run_id: str, source: OutputStore, target: OutputStore, *,
               client: redis.Redis | None = None, keys: RedisKeys | None = None,
               rows_per_file: int = ROWS_PER_FILE) -> ExportSummary:
    """Write the run's committed rows from `source` to `target`, one per job."""
    keys = keys or RedisKeys()
    chosen: dict[str, dict[str, _Row]] = {}  # modality -> job id -> newest row
    read = skipped = duplicates = 0
    for manifest_key in sorted(k for k in source.list("") if k.endswith(".json")):
        shard = _committed(source, manifest_key, client, keys)
        if shard is None:
            skipped += 1
            continue
        read += 1
        for row in _rows_of(source, manifest_key, shard, run_id):
            rows = chosen.setdefault(shard.modality, {})
            job_id = str(row.metadata["job_id"])
            if job_id in rows:
                duplicates += 1
                if rows[job_id].shard > row.shard:  # shard ids begin with their time
                    continue
            rows[job_id] = row
    counts, files = {}, {}
    for modality, rows in chosen.items():
        ordered = sorted(rows.values(), key=lambda r: (r.shard, str(r.metadata["job_id"])))
        files[modality] = _write(target, modality, ordered, rows_per_file)
        counts[modality] = len(ordered)
    return ExportSummary(counts, files, read, duplicates, skipped)


def _committed(store: OutputStore, manifest_key: str, client: redis.Redis | None,
               keys: RedisKeys) -> ShardManifest | None:
    raw = store.get(manifest_key)
    if raw is None:
        return None
    try:
        manifest = ShardManifest.model_validate_json(raw)
    except ValueError:
        log.warning("skipping %s: not a shard manifest", manifest_key)
        return None
    if client is not None and client.get(keys.shard(manifest.shard)) == b"":
        return None  # revoked: its rows were taken over by another writer
    return manifest


def _rows_of(store: OutputStore, manifest_key: str, manifest: ShardManifest,
             run_id: str) -> Iterator[_Row]:
    directory = manifest_key.rpartition("/")[0]
    prefix = f"{directory}/" if directory else ""
    try:
        vectors = np.load(io.BytesIO(store.get(prefix + manifest.embeddings) or b""),
                          allow_pickle=False)
        table = pq.read_table(io.BytesIO(store.get(prefix + manifest.metadata) or b""))
    except Exception:
        log.warning("skipping the rows of %s: its data could not be read", manifest_key,
                    exc_info=True)
        return
    for index, metadata in enumerate(table.to_pylist()):
        if metadata.get("run_id") == run_id:
            yield _Row(manifest.shard, vectors[index], metadata)


def _write(target: OutputStore, modality: str, rows: list[_Row], rows_per_file: int) -> int:
    files = 0
    for start in range(0, len(rows), rows_per_file):
        chunk = rows[start:start + rows_per_file]
        buffer = io.BytesIO()
        np.save(buffer, np.stack([row.vector for row in chunk]).astype(np.float32))
        target.put(f"{modality}/embeddings/emb_{files:05d}.npy", buffer.getvalue())
        target.put(f"{modality}/metadata/metadata_{files:05d}.parquet",
                   _parquet([_columns(row.metadata, modality) for row in chunk]))
        files += 1
    return files


def _columns(metadata: dict[str, object], modality: str) -> dict[str, object]:
    source = str(metadata["source"])
    named = ({"image_path": source} if modality == "image"
             else {"caption": source.removeprefix("text:")})
    return {"job_id": metadata["job_id"], "source": source, **named,
            "labels": metadata.get("labels") or [], "scores": metadata.get("scores") or [],
            "model": metadata.get("model"), "etag": metadata.get("etag"),
            "version": metadata.get("version"), "run_id": metadata.get("run_id")}


def _parquet(rows: list[dict[str, object]]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()
