"""What happens to one queue message: done (ack), retry later, requeue now, split, or
dead-lettered. The rules, and the tests that prove them, are in docs/reliability.md:

- A message is held at most `HOLD_FRACTION` of the visibility timeout; past that it is retried,
  so no message is held by a live worker for longer than that.
- A message that earlier deliveries did not finish (its consumer died and the sweep put it
  back, or its handling raised an unexpected error; `control/deadletters.py` keeps the count)
  runs alone in this process (`SuspectGate`), so a message that kills its worker takes no
  innocent message's delivery count with it. After `max_deliveries` unfinished deliveries it is
  quarantined; a message of several jobs is first split into single-job messages, so only the
  culprit is. A Redis outage or a drain puts a message back without counting. Only a message
  marked redelivered (put back on its queue: control/inflight.py) or retried is looked up.
- After SIGTERM (`begin_drain`) no message starts; held ones get until the drain deadline to
  finish and are requeued otherwise.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import ValidationError

from control.deadletters import DeadLetterStore, Delivery
from control.results import ResultStore, Settlement
from schemas.errors import ErrorCode, JobBusy, TransientError
from schemas.jobs import MAX_RUN_ID, RUN_ID, Job, JobMessage
from schemas.keys import canonical_model
from schemas.results import ErrorInfo, JobResult, Status, Timings
from schemas.settings import Settings
from worker.pipeline import Pipeline
from worker.suspect_gate import SuspectGate
from worker.validation import validation_code, validation_message

log = logging.getLogger(__name__)

# A message is held (unacknowledged) for at most this share of the visibility timeout, and may
# wait for the suspect gate for at most `GATE_FRACTION` of it.
HOLD_FRACTION = 0.7
GATE_FRACTION = 0.35
# A retry's countdown is spent holding the new message unacknowledged (Celery keeps ETA
# messages in memory), so it is capped at this share of the visibility timeout.
MAX_COUNTDOWN_FRACTION = 0.25
# SIGTERM → exit within `drain_timeout_s` (the grace period): held messages are settled (done
# or requeued) by grace − reserve, the pipeline is closed by grace − TEARDOWN_S, and the
# interpreter's own exit (about 2 s with torch loaded) takes the rest.
DRAIN_RESERVE_SHARE = 0.25
DRAIN_RESERVE_MIN_S, DRAIN_RESERVE_MAX_S = 3.0, 8.0
TEARDOWN_S = 2.0
_WAIT_SLICE_S = 0.25


@dataclass(frozen=True)
class Outcome:
    """What to do with a message after handling it."""

    retry: TransientError | None = None
    retry_after_s: float | None = None
    waits_for_lease: bool = False  # every job to retry is in another writer's live row
    waiting: tuple[Job, ...] = ()  # the jobs to retry that are in another writer's live row
    dead_lettered: bool = False
    requeue: str | None = None  # why the message goes back on the queue as it is
    resend: tuple[dict[str, Any], ...] = ()  # publish these, then ack (a split poison message)


def run_of(payload: Any) -> str | None:
    """The run a message's jobs count towards (a `JobMessage`'s `run_id`), if any."""
    run_id = payload.get("run_id") if isinstance(payload, dict) else None
    valid = isinstance(run_id, str) and 0 < len(run_id) <= MAX_RUN_ID and RUN_ID.match(run_id)
    return run_id if valid else None


class MessagePolicy:
    def __init__(self, settings: Settings, pipeline: Pipeline, results: ResultStore,
                 dead_letters: DeadLetterStore) -> None:
        self.settings = settings
        self._pipeline = pipeline
        self._results = results
        self._dead_letters = dead_letters
        self._gate = SuspectGate()
        self._draining = threading.Event()
        self._drain_deadline = float("inf")
        self.close_by = float("inf")

    # One message ---------------------------------------------------------------------------
    def handle(self, payload: Any, *, message_id: str, attempt: int,
               queue: str | None = None, redelivered: bool | None = None) -> Outcome:
        """`redelivered`: whether the message was put back on its queue before
        (control/inflight.py marks it so; None: not known). Only then, or on a retry, can
        earlier deliveries have left a record: a first delivery reads none."""
        received = time.monotonic()
        vt = self.settings.visibility_timeout_s
        if self._draining.is_set():
            return Outcome(requeue="the worker is draining")
        previous = (self._dead_letters.previous_delivery(message_id)
                    if redelivered is not False or attempt > 1 else None)
        if previous is not None and previous.count >= self.settings.max_deliveries:
            return self._quarantine(payload, message_id, previous, queue)
        if previous is not None:
            log.warning("message %s did not finish %d times before (%s); running it alone",
                        message_id, previous.count, previous.describe())
        with self._gate.enter(exclusive=previous is not None,
                              timeout=vt * GATE_FRACTION) as entered:
            if not entered:
                return Outcome(requeue="a message that did not finish before runs alone "
                                       "here, and that took too long")
            if self._draining.is_set():
                return Outcome(requeue="the worker is draining")
            outcome = self._handle_alone_or_not(
                payload, message_id, attempt, queue, received + vt * HOLD_FRACTION,
                redelivered=bool(redelivered) or previous is not None or attempt > 1)
        if previous is not None and outcome.requeue is None:
            self._dead_letters.end_delivery(message_id)
        return outcome

    def _handle_alone_or_not(self, payload: Any, message_id: str, attempt: int,
                             queue: str | None, deadline: float, *,
                             redelivered: bool) -> Outcome:
        jobs: list[Job] = []
        try:
            jobs = self._valid_jobs(payload, message_id, queue)
            outcome = (self._run(jobs, attempt, deadline, run_of(payload),
                                 recheck=redelivered) if jobs else Outcome())
        except TransientError as exc:  # the pipeline refused the work: not this message's fault
            outcome = Outcome(retry=exc)
        except redis.RedisError:
            raise  # Redis away: the message goes back as it is, and this does not count
        except Exception as exc:
            # Counted, with the error: an error that recurs on every delivery quarantines
            # the message like a crash would.
            self._note_error(message_id, exc)
            raise
        if outcome.retry is not None and attempt > self._retries_allowed(outcome):
            # Jobs that wait for another writer's row beside jobs that failed go on in a
            # message of their own: giving up cannot fail a row held within its lease, and
            # they would be left to nobody if its writer is dead.
            waiting = () if outcome.waits_for_lease else outcome.waiting
            waiting_ids = {job.job_id for job in waiting}
            self._give_up([job for job in jobs if job.job_id not in waiting_ids],
                          outcome.retry, payload, message_id, queue)
            outcome = Outcome(dead_lettered=True, resend=(JobMessage(
                jobs=list(waiting), run_id=run_of(payload)).model_dump(mode="json"),)
                if waiting else ())
        return outcome

    def _retries_allowed(self, outcome: Outcome) -> int:
        """`max_retries`; a message whose jobs only wait for another writer's row (its lease
        runs out, or that writer commits) is no failure of its own, so on top of those it may
        wait out a whole lease, retried at most a capped countdown apart. A writer killed just
        after reserving leaves a full lease (seen in a chaos run: a 60 s lease outlasted 8
        retries 7.5 s apart, and two messages were dead-lettered while their rows waited)."""
        if not outcome.waits_for_lease:
            return self.settings.max_retries
        countdown_cap_s = self.settings.visibility_timeout_s * MAX_COUNTDOWN_FRACTION
        return self.settings.max_retries + math.ceil(
            self.settings.claim_lease_s / countdown_cap_s) + 1

    def _note_error(self, message_id: str, exc: BaseException) -> None:
        try:
            self._dead_letters.note_error(message_id, f"{type(exc).__name__}: {exc}")
        except Exception:  # Redis may be the reason we are here
            log.warning("could not record the error of message %s", message_id, exc_info=True)

    def _run(self, jobs: list[Job], attempt: int, deadline: float, run_id: str | None, *,
             recheck: bool) -> Outcome:
        futures = self._pipeline.submit(jobs, attempts=attempt, run_id=run_id,
                                        recheck=recheck)
        job_of = dict(zip(futures, jobs, strict=True))
        pending = set(futures)
        done: set[concurrent.futures.Future[JobResult]] = set()
        while pending:
            limit = min(deadline, self._drain_deadline)
            if time.monotonic() >= limit:
                break
            finished, pending = concurrent.futures.wait(
                pending, timeout=min(limit - time.monotonic(), _WAIT_SLICE_S))
            done |= finished
        if pending:
            if self._draining.is_set():
                return Outcome(requeue=f"the drain deadline came with {len(pending)} jobs "
                                       "unfinished")
            return Outcome(retry=TransientError("the pipeline did not finish the message in time",
                                                code=ErrorCode.INTERNAL))
        errors = [f.exception() for f in done if f.exception() is not None]
        if not errors:
            return Outcome()
        busy = [e for e in errors if isinstance(e, JobBusy)]
        first = errors[0]
        retry = first if isinstance(first, TransientError) else TransientError(str(first))
        waiting = tuple(job_of[f] for f in done if isinstance(f.exception(), JobBusy))
        return Outcome(retry=retry, retry_after_s=max(b.retry_after_s for b in busy) if busy
                       else None, waits_for_lease=len(busy) == len(errors), waiting=waiting)

    # Validation ----------------------------------------------------------------------------
    def _valid_jobs(self, payload: Any, message_id: str, queue: str | None) -> list[Job]:
        """Parse the message job by job, so one malformed job does not sink its neighbours."""
        raw_jobs = payload.get("jobs") if isinstance(payload, dict) else None
        if not isinstance(raw_jobs, list) or not raw_jobs:
            self._reject(payload, ErrorCode.INVALID_JOB,
                         "a message is an object with a non-empty `jobs` list", message_id,
                         queue, index=None)
            return []
        jobs: list[Job] = []
        shared = payload.get("shared")
        for index, raw in enumerate(raw_jobs):
            if isinstance(shared, dict) and isinstance(raw, dict):
                raw = {**shared, **raw}  # a dead letter keeps the whole job
            try:
                job = JobMessage.model_validate({**payload, "jobs": [raw]}).jobs[0]
            except ValidationError as exc:
                self._reject(raw, validation_code(exc), validation_message(exc), message_id,
                             queue, index=index)
                continue
            if job.model != canonical_model(self.settings.model):
                self._fail_now(job, ErrorCode.WRONG_MODEL,
                               f"this worker serves {self.settings.model!r}, not {job.model!r}",
                               run_of(payload))
                continue
            jobs.append(job)
        return jobs

    def _reject(self, payload: Any, code: ErrorCode, error: str, message_id: str,
                queue: str | None, *, index: int | None) -> None:
        log.warning("rejecting malformed job in message %s: [%s] %s", message_id, code, error)
        self._dead_letters.add(payload=payload, code=code, error=error, message_id=message_id,
                               deliveries=1, queue=queue,
                               dedupe_key=f"{message_id}:{'message' if index is None else index}")

    def reject_undecodable(self, *, body: bytes | None, content_type: str | None,
                           error: str, message_id: str | None, queue: str | None) -> None:
        """A message that never reached the task: not JSON, or a refused content type."""
        self._dead_letters.add(payload=None, code=ErrorCode.INVALID_JOB, error=error,
                               message_id=message_id, deliveries=1, queue=queue, raw_body=body,
                               content_type=content_type,
                               dedupe_key=f"{message_id}:undecodable" if message_id else None)

    def _fail_now(self, job: Job, code: ErrorCode, message: str, run_id: str | None) -> None:
        result = JobResult(job_id=job.job_id, status=Status.FAILED, task=job.task,
                           model=job.model, source=job.source,
                           error=ErrorInfo(code=code, message=message),
                           timings=Timings(finished_at=time.time()))
        self._results.fail([Settlement(result, run_id, source=job.source)])

    def _unfinished(self, jobs: list[Job], run_id: str | None) -> list[Job]:
        """The jobs not done; those done (by another run, maybe) count in `run_id` once."""
        statuses = self._results.statuses([job.job_id for job in jobs])
        self._results.count_repeats([job.job_id for job, status in zip(jobs, statuses,
                                                                        strict=True)
                                     if status is Status.DONE], run_id)
        return [job for job, status in zip(jobs, statuses, strict=True)
                if status is not Status.DONE]

    # Poison messages and giving up ---------------------------------------------------------
    def _quarantine(self, payload: Any, message_id: str, previous: Delivery,
                    queue: str | None) -> Outcome:
        self._dead_letters.end_delivery(message_id)
        try:
            jobs = self._valid_jobs(payload, message_id, queue)
            unfinished = self._unfinished(jobs, run_of(payload))
        except Exception:  # what failed on every delivery may fail here too: quarantine anyway
            log.exception("message %s: its jobs could not be read for the quarantine",
                          message_id)
            jobs, unfinished = [], []
        if jobs and not unfinished:
            log.warning("message %s was lost %d times, but its jobs are all done", message_id,
                        previous.count)
            return Outcome()
        if len(unfinished) > 1:
            log.error("message %s killed its worker %d times; splitting its %d unfinished jobs "
                      "into one message each to find the culprit", message_id, previous.count,
                      len(unfinished))
            return Outcome(resend=tuple(
                JobMessage(jobs=[job], run_id=run_of(payload)).model_dump(mode="json")
                for job in unfinished))
        letter = self._dead_letters.add(
            payload=payload, code=ErrorCode.POISON_MESSAGE, error=previous.describe(),
            message_id=message_id, deliveries=previous.count, queue=queue,
            dedupe_key=f"{message_id}:poison")
        log.error("message %s quarantined as dead letter %s: %s", message_id, letter.id,
                  letter.error)
        for job in unfinished:
            self._fail_now(job, ErrorCode.POISON_MESSAGE,
                           f"its message did not finish on any of {previous.count} deliveries; "
                           f"quarantined as dead letter {letter.id}", run_of(payload))
        return Outcome(dead_lettered=True)

    def _give_up(self, jobs: list[Job], error: TransientError, payload: Any, message_id: str,
                 queue: str | None) -> None:
        for job in self._unfinished(jobs, run_of(payload)):
            self._fail_now(job, error.code, f"gave up after retries: {error.message}",
                           run_of(payload))
        self._dead_letters.add(payload=payload, code=error.code, error=error.message,
                               message_id=message_id, deliveries=self.settings.max_retries + 1,
                               queue=queue, dedupe_key=f"{message_id}:gave-up")

    # Shutdown ------------------------------------------------------------------------------
    def begin_drain(self, grace_s: float) -> None:
        """SIGTERM: start nothing new, settle held messages before the grace period ends."""
        now = time.monotonic()
        reserve = min(DRAIN_RESERVE_MAX_S, max(DRAIN_RESERVE_MIN_S, grace_s * DRAIN_RESERVE_SHARE))
        self.close_by = min(self.close_by, now + grace_s - TEARDOWN_S)
        self._drain_deadline = min(self._drain_deadline, now + grace_s - reserve)
        self._draining.set()
