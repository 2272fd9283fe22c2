"""Handling one delivery of an upload event, whatever brought it (SQS, a webhook, MinIO's Redis
target): its jobs enqueued, its broken records dead-lettered with their reasons, an SNS
subscription confirmed, and what it ignored counted by reason.

`handle` raises only for a fault that a redelivery can cure (Redis unreachable, SNS not
answering); the consumer then keeps the delivery for later. Doing a delivery twice is harmless:
the same records give the same job ids (a job already queued is not sent again) and the same
dead-letter ids.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from control.deadletters import DeadLetterStore
from producer.client import Client
from producer.event_records import Broken, Confirm, Ignored
from producer.events import Enqueue, EventJobTemplate, plan
from producer.metrics import EVENTS, source_kind
from producer.sns_confirm import SubscriptionConfirmer
from schemas.errors import SourceError
from schemas.jobs import Job

log = logging.getLogger(__name__)


@dataclass
class EventStats:
    """What deliveries came to: jobs enqueued, records dead-lettered, subscriptions confirmed,
    and records ignored, by reason (`producer.event_records.IGNORE_REASONS`)."""

    jobs: int = 0
    dead_lettered: int = 0
    confirmed: int = 0
    ignored: Counter[str] = field(default_factory=Counter)

    def merge(self, other: EventStats) -> None:
        self.jobs += other.jobs
        self.dead_lettered += other.dead_lettered
        self.confirmed += other.confirmed
        self.ignored.update(other.ignored)

    def as_dict(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "dead_lettered": self.dead_lettered,
                "confirmed": self.confirmed, "ignored": dict(sorted(self.ignored.items()))}


def _count(summary: EventStats, source: str) -> None:
    for outcome, count in (("enqueued", summary.jobs), ("dead_lettered", summary.dead_lettered),
                           ("confirmed", summary.confirmed)):
        if count:
            EVENTS.labels(source, outcome, "").inc(count)
    for reason, count in summary.ignored.items():
        EVENTS.labels(source, "ignored", reason).inc(count)


@dataclass
class EventSubmitter:
    client: Client
    template: EventJobTemplate
    dead_letters: DeadLetterStore
    confirmer: SubscriptionConfirmer = field(default_factory=SubscriptionConfirmer)
    stats: EventStats = field(default_factory=EventStats)  # every delivery handled so far

    def handle(self, body: str | bytes | Any, *, source: str,
               delivery: str | None = None) -> EventStats:
        """One delivery of one event body (`delivery`: its id, which keeps a redelivered
        record's dead letter one entry)."""
        summary = EventStats()
        jobs: dict[str, Job] = {}
        broken: list[Broken] = []
        for action in plan(body, self.template):
            if isinstance(action, Enqueue):
                jobs.setdefault(action.job.job_id, action.job)  # a duplicate record: one job
            elif isinstance(action, Ignored):
                summary.ignored[action.reason] += 1
            elif isinstance(action, Confirm):
                broken += self._confirm(action, summary)
            else:
                broken.append(action)
        if jobs:
            self.client.submit_many(list(jobs.values()))
        summary.jobs = len(jobs)
        for index, record in enumerate(broken):
            self._dead_letter(record, source, delivery, index)
        summary.dead_lettered = len(broken)
        self.stats.merge(summary)
        _count(summary, source_kind(source))
        if summary.ignored or broken:
            log.info("event from %s: %s", source, summary.as_dict())
        return summary

    def _confirm(self, confirm: Confirm, summary: EventStats) -> list[Broken]:
        try:
            self.confirmer.confirm(confirm.url)
        except SourceError as exc:
            return [Broken(exc.message, {"SubscribeURL": confirm.url, "TopicArn": confirm.topic},
                           exc.code)]
        log.info("confirmed the SNS subscription to %s", confirm.topic)
        summary.confirmed += 1
        return []

    def _dead_letter(self, record: Broken, source: str, delivery: str | None,
                     index: int) -> None:
        log.warning("dead-lettering an event record from %s: %s", source, record.reason)
        self.dead_letters.add(payload=record.received, code=record.code, error=record.reason,
                              message_id=delivery, deliveries=1, queue=source,
                              dedupe_key=f"{source}|{delivery}|{index}" if delivery else None)
