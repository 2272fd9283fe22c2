"""Results: what a job leaves behind in Redis, and the rows it adds to object storage."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from schemas.errors import ErrorCode
from schemas.jobs import Task


class Status(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class ErrorInfo(BaseModel):
    code: ErrorCode
    message: str


class LabelScore(BaseModel):
    label: str
    score: float


class OutputLocation(BaseModel):
    """Where the job's row lives in durable storage."""

    shard: str
    row: int


class Timings(BaseModel):
    """Milliseconds spent in each stage, and wall-clock stamps (Unix seconds)."""

    enqueued_at: float | None = None
    finished_at: float | None = None
    fetch_ms: float = 0.0
    decode_ms: float = 0.0
    encode_ms: float = 0.0
    write_ms: float = 0.0


class JobResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    status: Status
    # Known to the worker that settles the job; a result read back from Redis leaves them
    # out (the record keeps only what the job id does not already stand for).
    task: Task | None = None
    model: str | None = None
    source: str | None = None
    error: ErrorInfo | None = None
    labels: list[LabelScore] | None = None
    embedding: list[float] | None = None
    embedding_dim: int | None = None
    text_truncated: bool = False
    output: OutputLocation | None = None
    attempts: int = 0
    timings: Timings = Timings()

    @property
    def finished(self) -> bool:
        return self.status in (Status.DONE, Status.FAILED)


class RunProgress(BaseModel):
    """A run's counters: jobs published, and settled by outcome (schemas/keys.py `run`)."""

    run_id: str
    queued: int = 0
    done: int = 0
    failed: int = 0
    failed_by_code: dict[str, int] = {}
    listed: bool = False  # every job of this pass is published
    cursor: str | None = None  # the last source published, where a resumed listing goes on
    passes: int = 0

    @classmethod
    def from_fields(cls, run_id: str, fields: dict[str, str]) -> RunProgress:
        return cls(run_id=run_id, queued=int(fields.get("queued", 0)),
                   done=int(fields.get("done", 0)), failed=int(fields.get("failed", 0)),
                   failed_by_code={k.removeprefix("failed:"): int(v) for k, v in fields.items()
                                   if k.startswith("failed:") and int(v)},
                   listed=fields.get("listed") == "1", cursor=fields.get("cursor"),
                   passes=int(fields.get("pass", 0)))

    @property
    def exists(self) -> bool:
        return self.passes > 0 or self.queued > 0 or self.done > 0 or self.failed > 0

    @property
    def settled(self) -> int:
        return self.done + self.failed

    @property
    def finished(self) -> bool:
        """Every published job is settled, and there is nothing more to publish."""
        return self.listed and self.settled >= self.queued
