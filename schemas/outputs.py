"""Durable outputs: the manifest of a shard and the columns of its row-aligned metadata.

A shard is `<shard>.npy` (float32 [rows, dim], L2-normalised), `<shard>.parquet` (one
`MetadataRow` per row, in the same order) and `<shard>.json` (a `ShardManifest`, written last: a
shard counts only once its manifest exists). `ShardPaths` in `schemas/keys.py` names the paths;
`worker/outputs.py` writes the shards and maps each `ColumnType` to its Arrow type.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.jobs import Task


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ShardManifest(_Frozen):
    """`<shard>.json`: what a committed shard holds; `jobs[i]` is the job of row i."""

    shard: str
    model: str
    modality: str  # "image" or "text"
    rows: Annotated[int, Field(ge=1)]
    dim: Annotated[int, Field(ge=1)]
    embeddings: str  # the `.npy` file's name, in the manifest's directory
    metadata: str  # the `.parquet` file's name, in the manifest's directory
    jobs: tuple[str, ...]
    created_at: float  # Unix seconds
    writer: str | None = None  # the worker that wrote it

    @model_validator(mode="after")
    def _one_job_per_row(self) -> ShardManifest:
        if len(self.jobs) != self.rows:
            raise ValueError(f"{self.rows} rows but {len(self.jobs)} job ids")
        return self

    def row_of(self, job_id: str) -> int | None:
        """The row that holds `job_id`, or None if this shard does not hold it."""
        return self.jobs.index(job_id) if job_id in self.jobs else None


class ColumnType(StrEnum):
    """How a metadata column is stored."""

    INT32 = "int32"
    STRING = "string"
    BOOL = "bool"
    STRING_LIST = "list<string>"
    FLOAT32_LIST = "list<float32>"


class MetadataRow(_Frozen):
    """One row of `<shard>.parquet`: the job whose embedding is row `row` of the `.npy`.

    Each field is annotated with the `ColumnType` it is stored as; `METADATA_COLUMNS` lists them.
    """

    row: Annotated[int, ColumnType.INT32, Field(ge=0)]
    job_id: Annotated[str, ColumnType.STRING]
    source: Annotated[str, ColumnType.STRING]  # `Job.source`: an image URI, or "text:" + 64 chars
    etag: Annotated[str | None, ColumnType.STRING]  # of the source bytes, when known
    # The S3 version read, when the job named one (shards written before versions lack it).
    version: Annotated[str | None, ColumnType.STRING] = None
    task: Annotated[Task, ColumnType.STRING]
    model: Annotated[str, ColumnType.STRING]
    labels: Annotated[list[str], ColumnType.STRING_LIST]  # zero-shot labels, best first; else []
    scores: Annotated[list[float], ColumnType.FLOAT32_LIST]  # one per label
    text_truncated: Annotated[bool, ColumnType.BOOL]
    # The run whose message carried the job (`dualstream export RUN` selects by it).
    run_id: Annotated[str | None, ColumnType.STRING] = None

    @model_validator(mode="after")
    def _one_score_per_label(self) -> MetadataRow:
        if len(self.scores) != len(self.labels):
            raise ValueError(f"{len(self.labels)} labels but {len(self.scores)} scores")
        return self


METADATA_COLUMNS: dict[str, ColumnType] = {
    name: next(m for m in field.metadata if isinstance(m, ColumnType))
    for name, field in MetadataRow.model_fields.items()
}
