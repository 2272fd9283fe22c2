"""Everything one worker process holds: clients, the model, the pipeline; built once, lazily.

`handle` turns one queue message into pipeline work and decides its fate: done, retry later,
or dead-lettered.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from schemas.errors import ErrorCode, JobBusy, TransientError
from schemas.jobs import Job, JobMessage
from schemas.keys import RedisKeys
from schemas.results import ErrorInfo, JobResult, Status
from schemas.settings import Settings
from worker.connections import redis_client
from worker.deadletters import DeadLetterStore
from worker.health import HealthMonitor
from worker.models.base import Encoder
from worker.outputs import ShardWriter
from worker.pipeline import Pipeline
from worker.results import ResultStore
from worker.storage import SourceReader, output_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What to do with a message after handling it."""

    retry: TransientError | None = None
    retry_after_s: float | None = None
    dead_lettered: bool = False


def worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Runtime:
    def __init__(self, settings: Settings, encoder: Encoder | None = None) -> None:
        if encoder is None:
            from worker.models.loader import load_encoder

            encoder = load_encoder(settings.model, device=settings.device, dtype=settings.dtype)
        self.settings = settings
        self.encoder = encoder
        self.redis = redis_client(settings)
        keys = RedisKeys(settings.key_prefix)
        self.results = ResultStore(self.redis, keys, settings.result_ttl_s)
        self.dead_letters = DeadLetterStore(self.redis, keys)
        writer = ShardWriter(output_store(settings), self.results, worker=worker_name(),
                             lease_s=settings.claim_lease_s)
        self.pipeline = Pipeline(settings, encoder, SourceReader(settings), writer, self.results)
        self.health = HealthMonitor(
            Path(settings.health_dir), interval_s=settings.health_interval_s,
            stall_s=settings.stall_timeout_s, pipeline_ok=lambda: self.pipeline.healthy,
            last_progress=lambda: self.pipeline.last_progress, broker_ok=self._redis_ok)
        self.health.start()

    def _redis_ok(self) -> bool:
        try:
            return bool(self.redis.ping())
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    def handle(self, payload: Any, *, message_id: str, attempt: int,
               queue: str | None = None) -> Outcome:
        deliveries = self.dead_letters.count_delivery(message_id)
        if deliveries > self.settings.max_deliveries:
            self._quarantine(payload, message_id, deliveries, queue)
            return Outcome(dead_lettered=True)
        jobs = self._valid_jobs(payload, message_id, deliveries, queue)
        outcome = self._run(jobs, attempt) if jobs else Outcome()
        self.dead_letters.end_delivery(message_id)
        if outcome.retry is not None and attempt > self.settings.max_retries:
            self._give_up(jobs, outcome.retry, payload, message_id, deliveries, queue)
            return Outcome(dead_lettered=True)
        return outcome

    def _run(self, jobs: list[Job], attempt: int) -> Outcome:
        futures = self.pipeline.submit(jobs, attempts=attempt)
        done, pending = concurrent.futures.wait(
            futures, timeout=self.settings.visibility_timeout_s * 0.8)
        if pending:
            return Outcome(retry=TransientError("the pipeline did not finish the message in time",
                                                code=ErrorCode.INTERNAL))
        errors = [f.exception() for f in done if f.exception() is not None]
        if not errors:
            return Outcome()
        busy = [e for e in errors if isinstance(e, JobBusy)]
        first = errors[0]
        retry = first if isinstance(first, TransientError) else TransientError(str(first))
        return Outcome(retry=retry, retry_after_s=max(b.retry_after_s for b in busy) if busy
                       else None)

    def _valid_jobs(self, payload: Any, message_id: str, deliveries: int,
                    queue: str | None) -> list[Job]:
        """Parse the message job by job, so one malformed job does not sink its neighbours."""
        raw_jobs = payload.get("jobs") if isinstance(payload, dict) else None
        if not isinstance(raw_jobs, list) or not raw_jobs:
            self._reject(payload, "a message is an object with a non-empty `jobs` list",
                         message_id, deliveries, queue)
            return []
        jobs: list[Job] = []
        for raw in raw_jobs:
            try:
                job = JobMessage.model_validate({**payload, "jobs": [raw]}).jobs[0]
            except ValidationError as exc:
                self._reject(raw, exc.errors(include_url=False).__repr__()[:2000], message_id,
                             deliveries, queue)
                continue
            if job.model != self.settings.model:
                self._fail_now(job, ErrorCode.WRONG_MODEL,
                               f"this worker serves {self.settings.model!r}, not {job.model!r}")
                continue
            jobs.append(job)
        return jobs

    def _reject(self, payload: Any, error: str, message_id: str, deliveries: int,
                queue: str | None) -> None:
        log.warning("rejecting malformed job in message %s: %s", message_id, error)
        self.dead_letters.add(payload=payload, code=ErrorCode.INVALID_JOB, error=error,
                              message_id=message_id, deliveries=deliveries, queue=queue)

    def _fail_now(self, job: Job, code: ErrorCode, message: str) -> None:
        self.results.put_many([JobResult(job_id=job.job_id, status=Status.FAILED, task=job.task,
                                         model=job.model, source=job.source,
                                         error=ErrorInfo(code=code, message=message))])

    def _quarantine(self, payload: Any, message_id: str, deliveries: int,
                    queue: str | None) -> None:
        log.error("message %s started %d times without finishing: quarantined", message_id,
                  deliveries - 1)
        self.dead_letters.add(
            payload=payload, code=ErrorCode.POISON_MESSAGE, message_id=message_id,
            error=f"the worker was lost {deliveries - 1} times while processing this message",
            deliveries=deliveries - 1, queue=queue)
        self.dead_letters.end_delivery(message_id)
        jobs = self._valid_jobs(payload, message_id, deliveries, None)
        for job in jobs:
            self._fail_now(job, ErrorCode.POISON_MESSAGE,
                           "the message killed its worker on every delivery; see the DLQ")

    def _give_up(self, jobs: list[Job], error: TransientError, payload: Any, message_id: str,
                 deliveries: int, queue: str | None) -> None:
        unfinished = [job for job, status in zip(jobs, self.results.statuses(
            [j.job_id for j in jobs]), strict=True) if status is not Status.DONE]
        for job in unfinished:
            self._fail_now(job, error.code, f"gave up after retries: {error.message}")
        self.dead_letters.add(payload=payload, code=error.code, error=error.message,
                              message_id=message_id, deliveries=deliveries, queue=queue)

    def close(self) -> None:
        self.health.stop()
        self.pipeline.close(self.settings.drain_timeout_s)


_runtimes: dict[int, Runtime] = {}
_runtime_lock = threading.Lock()


def get_runtime(settings: Settings) -> Runtime:
    """The process's runtime, built on first use (so a forked child never inherits CUDA)."""
    with _runtime_lock:
        key = os.getpid()
        if key not in _runtimes:
            _runtimes[key] = Runtime(settings)
        return _runtimes[key]


def close_runtime() -> None:
    with _runtime_lock:
        runtime = _runtimes.pop(os.getpid(), None)
    if runtime is not None:
        runtime.close()
