"""Settling a job: done, failed, retried, or already done by an earlier delivery.

A job's future resolves to its `JobResult` once that result is in Redis, or raises a
`TransientError` that the caller retries. A permanent failure is a `failed` result for that job
alone, recorded like any other; an unexpected exception is one too (code `internal`), logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis

from control.results import ResultStore, Settlement
from schemas.errors import DualstreamError, ErrorCode, PermanentError, TransientError
from schemas.results import ErrorInfo, JobResult, OutputLocation, Status
from worker import metrics
from worker.items import Item
from worker.outputs import OutputRow

log = logging.getLogger(__name__)


def done_result(item: Item, row: OutputRow, location: OutputLocation | None) -> JobResult:
    return JobResult(
        job_id=item.job.job_id, status=Status.DONE, task=item.job.task, model=item.job.model,
        source=item.job.source, labels=row.labels,
        embedding=row.embedding.tolist() if item.job.return_embedding else None,
        embedding_dim=int(row.embedding.shape[-1]), text_truncated=row.text_truncated,
        output=location, attempts=item.attempts, timings=item.timings,
    )


def failed_result(item: Item, exc: BaseException) -> JobResult:
    code = exc.code if isinstance(exc, DualstreamError) else ErrorCode.INTERNAL
    message = (exc.message if isinstance(exc, DualstreamError)
               else f"{type(exc).__name__}: {exc}")
    return JobResult(
        job_id=item.job.job_id, status=Status.FAILED, task=item.job.task,
        model=item.job.model, source=item.job.source,
        error=ErrorInfo(code=code, message=message), attempts=item.attempts,
        timings=item.timings,
    )


def settlement(item: Item, result: JobResult) -> Settlement:
    return Settlement(result, item.run_id, source=item.job.source)


def as_transient(exc: BaseException) -> TransientError | None:
    """The error to retry `exc` with, or None where retrying cannot help."""
    if isinstance(exc, TransientError):
        return exc
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return TransientError(f"Redis unreachable: {exc}", code=ErrorCode.TRANSIENT_BROKER)
    return None


class Settler:
    def __init__(self, results: ResultStore) -> None:
        self._results = results

    def done(self, finished: Sequence[tuple[Item, JobResult]]) -> None:
        """Resolve the futures of jobs whose rows are committed (their records with them)."""
        for item, result in finished:
            metrics.observe_done(item.timings)
            item.future.set_result(result)

    def already_done(self, item: Item) -> None:
        """Resolve from the result an earlier delivery stored."""
        existing = self._results.get(item.job.job_id)
        metrics.observe("already_done")
        if existing is None:
            item.future.set_exception(TransientError("result vanished; retrying",
                                                     code=ErrorCode.TRANSIENT_BROKER))
        else:
            item.future.set_result(existing)

    def retry(self, item: Item, exc: TransientError) -> None:
        if not item.future.done():
            metrics.observe("retried", exc.code.value)
            item.future.set_exception(exc)

    def fail(self, item: Item, exc: BaseException) -> None:
        """Route a failure to this job alone: retried if transient, else a `failed` result."""
        if item.future.done():
            return
        transient = as_transient(exc)
        if transient is not None:
            self.retry(item, transient)
            return
        if not isinstance(exc, PermanentError):
            log.exception("job %s failed unexpectedly", item.job.job_id, exc_info=exc)
        self._record_failure(item, failed_result(item, exc))

    def _record_failure(self, item: Item, result: JobResult) -> None:
        try:
            self._results.fail([settlement(item, result)])
        except Exception as write_exc:  # noqa: BLE001 - the job is retried instead
            self.retry(item, TransientError(f"recording the failure failed: {write_exc}",
                                            code=ErrorCode.TRANSIENT_BROKER))
            return
        metrics.observe("failed", result.error.code.value if result.error else "")
        item.future.set_result(result)
