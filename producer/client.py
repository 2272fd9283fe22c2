"""The Python client: submit jobs, then fetch their results.

    client = Client(Settings())
    job_id = client.classify("s3://photos/cat.jpg", ["cat", "dog"], model="kakaobrain/align-base")
    result = client.result(job_id, timeout=30)
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

from celery import Celery

from control.broker import producer_app
from control.connections import redis_client
from control.results import ResultStore
from schemas.jobs import MAX_JOBS_PER_MESSAGE, Job, JobMessage, Task, ZeroShotOptions
from schemas.keys import TASK_NAME, RedisKeys, queue_name
from schemas.results import JobResult, Status
from schemas.settings import Settings


def _chunks(items: Iterable[Job], size: int) -> Iterator[list[Job]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


PRODUCER_REDIS_RETRIES = 40


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

    # Building jobs -------------------------------------------------------------------------
    def _model(self, model: str | None) -> str:
        chosen = model or self.settings.model
        if not chosen:
            raise ValueError("no model given and DUALSTREAM_MODEL is not set")
        return chosen

    def embed_image(self, image: str, *, model: str | None = None, **options: object) -> str:
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
                               zero_shot=options))

    # Submitting ----------------------------------------------------------------------------
    def submit(self, job: Job) -> str:
        return self.submit_many([job])[0]

    def submit_many(self, jobs: Iterable[Job], *, per_message: int = 32,
                    run_id: str | None = None, skip_done: bool = True) -> list[str]:
        """Enqueue jobs, several per message; jobs already done (same id) are not re-sent."""
        per_message = max(1, min(per_message, MAX_JOBS_PER_MESSAGE))
        ids: list[str] = []
        with self.app.producer_or_acquire() as producer:
            for chunk in _chunks(jobs, per_message):
                ids += self._send_chunk(chunk, producer, run_id, skip_done)
        return ids

    def _send_chunk(self, chunk: list[Job], producer: object, run_id: str | None,
                    skip_done: bool) -> list[str]:
        ids = [job.job_id for job in chunk]
        if run_id:
            self.redis.sadd(self.keys.run_jobs(run_id), *ids)
        queued = [JobResult(job_id=job.job_id, status=Status.QUEUED, task=job.task,
                            model=job.model, source=job.source) for job in chunk]
        for result in queued:
            result.timings.enqueued_at = time.time()
        self.results.mark_queued(queued)
        statuses = self.results.statuses(ids) if skip_done else [None] * len(ids)
        todo = [job for job, status in zip(chunk, statuses, strict=True)
                if status is not Status.DONE]
        by_model: dict[str, list[Job]] = {}
        for job in todo:
            by_model.setdefault(job.model, []).append(job)
        for model, model_jobs in by_model.items():
            message = JobMessage(jobs=model_jobs, run_id=run_id)
            self.app.send_task(TASK_NAME, args=[message.model_dump(mode="json")],
                               queue=queue_name(model), producer=producer)
        return ids

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

    def run_job_ids(self, run_id: str) -> list[str]:
        members = self.redis.smembers(self.keys.run_jobs(run_id))
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)
