"""How much work a model's queue holds: jobs queued plus jobs held by consumers, for scaling.

A message carries up to 256 jobs, so a queue's length says little about its work; and a busy
worker's messages are in its in-flight list, not on the queue. An autoscaler that watched only
the list would scale busy workers away, and would see nothing of what a killed worker held.
`queue_load` counts jobs in both places (the held ones of dead consumers included, until a sweep
puts them back on the queue), reading every message when the queue is short and a sample from
both ends when it is long. It is what `dualstream queue-load` prints and what the API's scaling
endpoint serves to KEDA.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, cast

import redis

from schemas.keys import RedisKeys

# A queue up to this long is read whole; a longer one by this many messages from each end.
READ_WHOLE_UP_TO = 512
SAMPLE_EACH_END = 64


@dataclass(frozen=True)
class QueueLoad:
    queue: str
    queued_messages: int
    queued_jobs: int  # exact up to READ_WHOLE_UP_TO messages, estimated from a sample above
    held_messages: int
    held_jobs: int
    live_consumers: int  # consumers of this queue whose heartbeat is current

    @property
    def jobs(self) -> int:
        return self.queued_jobs + self.held_jobs

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "jobs": self.jobs}


def jobs_in_message(raw: bytes) -> int:
    """Jobs in one queued Celery message of `dualstream.process` (1 for anything unreadable:
    it is still work a worker must take, if only to dead-letter it)."""
    try:
        envelope = json.loads(raw)
        body = envelope["body"]
        args = json.loads(body)[0]
        return max(1, len(args[0]["jobs"]))
    except (ValueError, KeyError, IndexError, TypeError):
        return 1


def queue_load(client: redis.Redis, keys: RedisKeys, queue: str, *,
               heartbeat_ttl_s: float) -> QueueLoad:
    queued = cast(int, client.llen(queue))
    if queued <= READ_WHOLE_UP_TO:
        sample = cast(list[bytes], client.lrange(queue, 0, -1))
    else:
        sample = (cast(list[bytes], client.lrange(queue, 0, SAMPLE_EACH_END - 1))
                  + cast(list[bytes], client.lrange(queue, -SAMPLE_EACH_END, -1)))
    sampled_jobs = sum(jobs_in_message(raw) for raw in sample)
    queued_jobs = (sampled_jobs if queued <= READ_WHOLE_UP_TO
                   else round(sampled_jobs * queued / max(1, len(sample))))
    lists, live = _consumers_of(client, keys, queue, heartbeat_ttl_s)
    pipe = client.pipeline(transaction=False)
    for key in lists:
        pipe.lrange(key, 0, -1)
    held = [raw for messages in pipe.execute() for raw in messages]
    return QueueLoad(queue=queue, queued_messages=queued, queued_jobs=queued_jobs,
                     held_messages=len(held), held_jobs=sum(jobs_in_message(raw) for raw in held),
                     live_consumers=live)


def _consumers_of(client: redis.Redis, keys: RedisKeys, queue: str,
                  heartbeat_ttl_s: float) -> tuple[list[bytes], int]:
    """The in-flight lists of `queue` (dead consumers' included), and how many are alive: an
    entry's score is its last heartbeat, in the Redis server's milliseconds."""
    seconds, micros = cast(tuple[int, int], client.time())
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    entries = cast(list[tuple[bytes, float]],
                   client.zrange(keys.consumers, 0, -1, withscores=True))
    mine = [(key, score) for key, score in entries
            if key.decode(errors="replace").rpartition("|")[2] == queue]
    live = sum(1 for _, score in mine if now_ms - score < heartbeat_ttl_s * 1000)
    return [key for key, _ in mine], live
