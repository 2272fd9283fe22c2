"""The dead-letter store, and the delivery records that find poison messages.

A dead letter is a message (or one job of it) that failed for good, kept in Redis for an
operator: the original payload, the error code, the last error and how many times the message
was delivered. `dualstream dlq list|show|replay|purge` manages them; replay re-sends the payload.

A delivery record (`ds:deliveries:<message id>`, a hash) is written when a worker starts a
message and deleted when it finishes, whatever the outcome. A record that is still there when
the message arrives again means that an earlier delivery never finished: its worker died.
The record counts such starts, says which worker ran the last one, and keeps the last error
seen, so that a message that kills its worker every time is quarantined after
`max_deliveries` starts, with whatever is known about why.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import BaseModel

from schemas.errors import ErrorCode
from schemas.keys import RedisKeys

DELIVERY_RECORD_TTL_S = 24 * 3600
RAW_BODY_LIMIT = 64 * 1024


class DeadLetter(BaseModel):
    id: str
    message_id: str | None
    code: ErrorCode
    error: str
    deliveries: int
    payload: Any
    queue: str | None = None
    at: float
    # A message whose body never decoded (not JSON, or a refused content type such as pickle):
    # its bytes, base64-encoded and never deserialised, and the content type it claimed.
    raw_body: str | None = None
    content_type: str | None = None

    @property
    def replayable(self) -> bool:
        return self.raw_body is None and self.payload is not None


@dataclass(frozen=True)
class Delivery:
    """An earlier start of a message that may not have finished."""

    count: int
    worker: str | None = None
    started_at: float | None = None
    last_error: str | None = None

    def describe(self) -> str:
        """What the quarantine records as the message's last error."""
        where = f" on {self.worker}" if self.worker else ""
        when = (time.strftime(" at %Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at))
                if self.started_at else "")
        lost = (f"the worker was lost {self.count} times while processing this message "
                f"(last start{where}{when})")
        return f"{lost}; last error: {self.last_error}" if self.last_error else lost


def json_safe(value: Any) -> Any:
    """`value` with every string encodable as UTF-8: a lone surrogate (valid in JSON's
    `\\udcff` escapes, not in UTF-8) is kept as the visible text `\\udcff`."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [json_safe(item) for item in value]
    if isinstance(value, dict):
        return {json_safe(key): json_safe(item) for key, item in value.items()}
    return value


def _text(raw: bytes | str | None) -> str | None:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


class DeadLetterStore:
    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self._redis = client
        self._keys = keys

    # Delivery records ----------------------------------------------------------------------
    def previous_delivery(self, message_id: str) -> Delivery | None:
        """The record an unfinished earlier start of this message left, if any."""
        raw = self._redis.hgetall(self._keys.deliveries(message_id))
        if not raw:
            return None
        started = _text(raw.get(b"started_at"))
        return Delivery(count=int(raw.get(b"count", b"0")), worker=_text(raw.get(b"worker")),
                        started_at=float(started) if started else None,
                        last_error=_text(raw.get(b"last_error")))

    def count_delivery(self, message_id: str, worker: str | None = None) -> int:
        """Counts starts of a message that have not ended; a crash leaves the count standing."""
        key = self._keys.deliveries(message_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(key, "count", 1)
        pipe.hset(key, mapping={"worker": worker or "", "started_at": repr(time.time())})
        pipe.expire(key, DELIVERY_RECORD_TTL_S)
        count, _, _ = pipe.execute()
        return int(count)

    def note_error(self, message_id: str, error: str) -> None:
        """Keep the last error of a delivery that will be retried, for a later quarantine."""
        key = self._keys.deliveries(message_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(key, "last_error", error[:2000])
        pipe.expire(key, DELIVERY_RECORD_TTL_S)
        pipe.execute()

    def end_delivery(self, message_id: str) -> None:
        self._redis.delete(self._keys.deliveries(message_id))

    # Dead letters --------------------------------------------------------------------------
    def add(self, *, payload: Any, code: ErrorCode, error: str, message_id: str | None,
            deliveries: int, queue: str | None, raw_body: bytes | None = None,
            content_type: str | None = None, dedupe_key: str | None = None) -> DeadLetter:
        """Store a dead letter. With a `dedupe_key` (derived from the message id) it is
        idempotent: a message dead-lettered again after a redelivery replaces its entry."""
        letter_id = (hashlib.sha256(dedupe_key.encode()).hexdigest()[:32] if dedupe_key
                     else uuid.uuid4().hex)
        letter = DeadLetter(
            id=letter_id, message_id=message_id, code=code, error=json_safe(error),
            deliveries=deliveries, payload=json_safe(payload), queue=queue, at=time.time(),
            raw_body=(base64.b64encode(raw_body[:RAW_BODY_LIMIT]).decode()
                      if raw_body is not None else None),
            content_type=content_type)
        self._redis.hset(self._keys.dead_letters, letter.id, letter.model_dump_json())
        return letter

    def list(self) -> list[DeadLetter]:
        raw = self._redis.hvals(self._keys.dead_letters)
        return sorted((DeadLetter.model_validate_json(item) for item in raw), key=lambda d: d.at)

    def get(self, letter_id: str) -> DeadLetter | None:
        raw = self._redis.hget(self._keys.dead_letters, letter_id)
        return DeadLetter.model_validate_json(raw) if raw else None

    def remove(self, letter_id: str) -> bool:
        return bool(self._redis.hdel(self._keys.dead_letters, letter_id))

    def purge(self) -> int:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hlen(self._keys.dead_letters)
        pipe.delete(self._keys.dead_letters)
        count, _ = pipe.execute()
        return int(count)


def payload_preview(payload: Any, limit: int = 200) -> str:
    text = json.dumps(payload, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "…"
