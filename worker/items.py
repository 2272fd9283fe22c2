"""What travels through the engine: one job's `Item`, and an `EncodedBatch` for the writer."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from schemas.jobs import Job
from schemas.results import JobResult, LabelScore, Timings
from worker.tensor_decode import CheckedJpeg


@dataclass(eq=False)
class Item:
    job: Job
    future: Future[JobResult]
    attempts: int
    enqueued_at: float
    run_id: str | None = None  # the run whose counters this job moves when it settles
    etag: str | None = None
    pixels: torch.Tensor | None = None
    jpeg: CheckedJpeg | None = None  # image_decoder="torch": decoded on the model thread
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True)
class EncodedBatch:
    items: list[Item]
    embeddings: np.ndarray
    labels: list[list[LabelScore] | None]
    truncated: list[bool]
    modality: str


def ms_since(start: float) -> float:
    """Milliseconds since `start`, a `time.perf_counter()` reading."""
    return (time.perf_counter() - start) * 1000
