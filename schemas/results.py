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
    task: Task
    model: str
    source: str
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
