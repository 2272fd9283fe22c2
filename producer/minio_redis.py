"""Upload events from MinIO's Redis target (`notify_redis`, `format=access`): MinIO appends
each event to a list (RPUSH), as `[{"Event": [record], "EventTime": …}]`.

Nothing taken is lost: `BLMOVE` moves the oldest element into this consumer's processing list
in one command, and it leaves that list (`LREM`) only after its delivery was handled. What a
consumer holds there when it dies (or when handling failed for a fault worth retrying) is the
first thing it handles when it runs again, before it takes anything new; a delivery handled
twice gives the same job ids, so it is one job. Each consumer names its processing list
(`<list>:dualstream-processing:<consumer>`); run one consumer per name.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass

import redis

from producer.event_sources import EventStats, EventSubmitter

log = logging.getLogger(__name__)


@dataclass
class MinioRedisConsumer:
    target: redis.Redis  # the Redis MinIO writes to
    key: str  # MinIO's `key` setting: the list
    submitter: EventSubmitter
    consumer: str = "default"
    block_s: int = 5
    pause_s: float = 1.0

    @property
    def processing(self) -> str:
        return f"{self.key}:dualstream-processing:{self.consumer}"

    def take(self) -> bytes | None:
        """What this consumer still holds (taken before a crash or a failed try), or the
        oldest new element, moved into its processing list; None when none came."""
        held = self.target.lindex(self.processing, 0)
        if held is not None:
            return bytes(held)  # type: ignore[arg-type]
        taken = self.target.blmove(self.key, self.processing, self.block_s, "LEFT", "RIGHT")
        return bytes(taken) if taken is not None else None  # type: ignore[arg-type]

    def step(self) -> bool:
        """Take one element, handle it, let it go; False when none came."""
        element = self.take()
        if element is None:
            return False
        self.submitter.handle(element, source=f"redis:{self.key}",
                              delivery=hashlib.sha256(element).hexdigest()[:32])
        self.target.lrem(self.processing, 1, element)  # type: ignore[arg-type]
        return True

    def run(self, stop: threading.Event | None = None) -> EventStats:
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("an event from %s could not be handled; it stays in %s",
                              self.key, self.processing)
                stop.wait(self.pause_s)
        return self.submitter.stats
