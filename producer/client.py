"""The Python client: submit jobs, then fetch their results.

    client = Client(Settings())
    job_id = client.classify("s3://photos/cat.jpg", ["cat", "dog"], model="kakaobrain/align-base")
    result = client.result(job_id, timeout=30)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import Any

from celery import Celery

from control.broker import producer_app
from control.connections import redis_client
from control.publish import RunCount, TaskPublisher
from control.results import ResultStore, RunStore
from producer.bulk import source_etag
from schemas.jobs import MAX_JOBS_PER_MESSAGE, Job, Task, ZeroShotOptions, pack_message
from schemas.keys import RedisKeys, queue_name
from schemas.records import record_status, run_tag
from schemas.results import JobResult, RunProgress, Status
from schemas.settings import Settings


def _chunks(items: Iterable[Job], size: int) -> Iterator[list[Job]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


PRODUCER_REDIS_RETRIES = 40
MESSAGES_PER_TRIP = 16
RUN_POLL_S = 0.25


class ResultTimeout(TimeoutError):
    pass


class Client:
    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.settings = settings
        self.app = app or producer_app(settings)
        # Rides out a Redis restart or failover of about a minute, as publishing does.
        self.redis = redis_client(settings, retries=PRODUCER_REDIS_RETRIES)
        self.keys = RedisKeys(settings.key_prefix)
        self.results = ResultStore(self.redis, self.keys, settings.result_ttl_s)
        self.runs = RunStore(self.redis, self.keys, settings.result_ttl_s)
        self.publisher = TaskPublisher(self.redis, settings)

    def check_connection(self) -> None:
        """One PING without the long retries: a wrong address or password fails at once
        (`redis.ConnectionError`, `redis.AuthenticationError`)."""
        quick = redis_client(self.settings, retries=1, timeout_s=5)
        try:
            quick.ping()
        finally:
            quick.close()

    # Building jobs -------------------------------------------------------------------------
    def _model(self, model: str | None) -> str:
        chosen = model or self.settings.model
        if not chosen:
            raise ValueError("no model given and DUALSTREAM_MODEL is not set")
        return chosen

    def embed_image(self, image: str, *, model: str | None = None, **options: object) -> str:
        """A local file's job names its content too (`etag`), so an edited file is a new job."""
        options.setdefault("etag", source_etag(image))
        return self.submit(Job(task=Task.IMAGE_EMBEDDING, image=image, model=self._model(model),
                               **options))  # type: ignore[arg-type]

    def embed_text(self, text: str, *, model: str | None = None, **options: object) -> str:
        return self.submit(Job(task=Task.TEXT_EMBEDDING, text=text, model=self._model(model),
                               **options))  # type: ignore[arg-type]

    def classify(self, image: str, labels: Sequence[str], *, model: str | None = None,
                 templates: list[str] | str = "default", top_k: int = 5,
                 threshold: float | None = None, multi_label: bool = False) -> str:
        options = ZeroShotOptions(labels=list(labels), templates=templates,  # type: ignore[arg-type]
                                  top_k=top_k, threshold=threshold, multi_label=multi_label)
        return self.submit(Job(task=Task.ZERO_SHOT, image=image, model=self._model(model),
                               zero_shot=options, etag=source_etag(image)))

    # Submitting ----------------------------------------------------------------------------
    def submit(self, job: Job, *, force: bool = False) -> str:
        """Enqueue one job; one already done is not run again, unless `force`. A job that
        failed is run again, and `result` waits for its new outcome."""
        return self.submit_many([job], force=force)[0]

    def submit_many(self, jobs: Iterable[Job], *, per_message: int = 32,
                    run_id: str | None = None, skip_done: bool = True,
                    count_in_run: bool = True, force: bool = False) -> list[str]:
        """Enqueue jobs, several per message; returns every job's id.

        Without a run, each job gets a `queued` record, and one already queued, being
        written or done (same id) is not sent again, unless `skip_done=False`. Under a run,
        jobs get no record until they settle: those done or in progress are skipped, and the
        run counts what was sent (`run_progress`), unless `count_in_run` is False (jobs it
        counted before, replayed from the dead-letter store). With `force`, every job is sent
        and those done (or being written) are set back to queued, so that a worker computes
        them again. Jobs go out `MESSAGES_PER_TRIP` messages at a time, in one round trip
        (and one more to check a run's jobs first)."""
        per_message = max(1, min(per_message, MAX_JOBS_PER_MESSAGE))
        ids: list[str] = []
        for group in _chunks(jobs, per_message * MESSAGES_PER_TRIP):
            ids += self._send_group(group, per_message, run_id, skip_done, count_in_run, force)
        return ids

    def _send_group(self, group: list[Job], per_message: int, run_id: str | None,
                    skip_done: bool, count_in_run: bool, force: bool) -> list[str]:
        ids = [job.job_id for job in group]
        if run_id is None:
            # The publish script itself queues their records and skips what is not new.
            send, new, reset = [True] * len(ids), [False] * len(ids), [True] * len(ids)
        else:
            send, new, reset = self._run_choice(ids, run_id, skip_done, force)
        messages: list[tuple[str, dict[str, Any]]] = []
        records: list[list[str]] = []
        for start in range(0, len(group), per_message):
            window = slice(start, start + per_message)
            chunk = [(job, again) for job, chosen, again
                     in zip(group[window], send[window], reset[window], strict=True) if chosen]
            by_model: dict[str, list[tuple[Job, bool]]] = {}
            for job, again in chunk:
                by_model.setdefault(job.model, []).append((job, again))
            for model, pairs in by_model.items():
                messages.append((queue_name(model),
                                 pack_message([job for job, _ in pairs], run_id)))
                records.append([job.job_id for job, again in pairs if again])
        count = (RunCount(run_id, sum(new), cursor=group[-1].source)
                 if run_id is not None and count_in_run else None)
        # One script: the pushes and the run's count and cursor (or the single submissions'
        # records) land together or not at all, so a producer killed here sends the whole
        # batch again on resuming, counted once.
        self.publisher.publish(messages, count, records=records, resend=not skip_done,
                               force=force)
        return ids

    def _run_choice(self, ids: list[str], run_id: str, skip_done: bool,
                    force: bool) -> tuple[list[bool], list[bool], list[bool]]:
        """Per job of a run: send it, count it as newly queued, set its record back to
        queued? A job done or in progress is skipped; one that failed is sent again, and
        counted only if another run failed it (this run counted it already: queued, then
        failed). With `force`, every job is sent, and one done or being written is counted
        again and its record set back to queued (a failed one keeps its record, which the
        worker's reservation moves from the run's failed count)."""
        if not skip_done and not force:
            return [True] * len(ids), [True] * len(ids), [False] * len(ids)
        tag = run_tag(run_id)
        send, new, reset = [], [], []
        for raw in self.results.records(ids):
            status = record_status(raw)
            retry_ours = status is Status.FAILED and raw is not None and raw[1:4] == tag
            send.append(force or status in (None, Status.FAILED))
            new.append(not retry_ours if force else
                       status is None or (status is Status.FAILED and not retry_ours))
            reset.append(force and status is Status.DONE)
        return send, new, reset

    # Results -------------------------------------------------------------------------------
    def status(self, job_id: str) -> Status | None:
        return self.results.statuses([job_id])[0]

    def result(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Wait for a job to finish (done or failed) and return its result."""
        return self.wait([job_id], timeout=timeout)[0]

    def wait(self, job_ids: Sequence[str], timeout: float | None = None) -> list[JobResult]:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while True:
            results = self.results.get_many(job_ids)
            if all(r is not None and r.finished for r in results):
                return [r for r in results if r is not None]
            if deadline is not None and time.monotonic() >= deadline:
                unfinished = sum(1 for r in results if r is None or not r.finished)
                raise ResultTimeout(f"{unfinished} of {len(job_ids)} jobs unfinished")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def run_progress(self, run_id: str) -> RunProgress:
        return self.runs.progress(run_id)

    def wait_run(self, run_id: str, timeout: float | None = None,
                 on_progress: Callable[[RunProgress], None] | None = None) -> RunProgress:
        """Wait until every job the run published is settled; one read of its counters per
        poll, however many jobs it has."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            progress = self.runs.progress(run_id)
            if on_progress is not None:
                on_progress(progress)
            if progress.finished:
                return progress
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"run {run_id}: {progress.queued - progress.settled} of "
                                    f"{progress.queued} jobs unfinished")
            time.sleep(RUN_POLL_S)
