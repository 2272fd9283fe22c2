"""The dead-letter store, and the delivery records that find poison messages.

A dead letter is a message (or one job of it) that failed for good, kept in Redis for an
operator: the original payload, the error code, the last error and how many times the message
was delivered. `dualstream dlq list|show|replay|purge` manages them; replay re-sends the payload.

A delivery record (`ds:deliveries:<message id>`, a hash) exists only for a message whose
earlier delivery did not finish: the sweep that put it back after its consumer died counts it
`lost` (and names that consumer, `control/inflight.py`), and a delivery whose handling raised
an unexpected error counts it in `errors`, with the error. A Redis outage or a drain counts as
neither: the message was put back by a live worker, not lost. Once the message finishes, its
record goes. A message whose record reaches `max_deliveries` unfinished deliveries is
quarantined, with whatever is known about why.

The store is capped (`dead_letter_max_entries`, `dead_letter_max_bytes`): past either cap the
oldest letters are trimmed, and counted (`trimmed()`), so a flood of bad input cannot fill
Redis. Letters are ordered in `<dlq>:order` (scored by time) and their bytes summed in
`<dlq>:stats`, whether added here or by a worker that buries a message in one step with its
in-flight removal (control/inflight.py).
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
from schemas.settings import Settings

RAW_BODY_LIMIT = 64 * 1024
MAX_ENTRIES = 10_000
MAX_BYTES = 64 * 1024 * 1024

DELIVERY_RECORD_TTL_S = 24 * 3600

# A letter that replaces one with the same id (a redelivery) counts its new size only. A Lua
# function, so that the in-flight ledger's bury (control/inflight.py) adds in the same step.
ADD_LETTER_LUA = """
local function add_letter(letters, order, stats, id, letter, at, max_entries, max_bytes)
  local old = redis.call('HSTRLEN', letters, id)
  redis.call('HSET', letters, id, letter)
  redis.call('ZADD', order, at, id)
  local bytes = redis.call('HINCRBY', stats, 'bytes', string.len(letter) - old)
  local trimmed = 0
  while redis.call('HLEN', letters) > tonumber(max_entries) or bytes > tonumber(max_bytes) do
    local oldest = redis.call('ZPOPMIN', order)
    if #oldest == 0 then break end
    local size = redis.call('HSTRLEN', letters, oldest[1])
    redis.call('HDEL', letters, oldest[1])
    bytes = redis.call('HINCRBY', stats, 'bytes', -size)
    trimmed = trimmed + 1
  end
  if trimmed > 0 then redis.call('HINCRBY', stats, 'trimmed', trimmed) end
  return trimmed
end
"""

# KEYS: the letters, their order, the stats. ARGV: id, letter, time, max entries, max bytes.
_ADD = ADD_LETTER_LUA + """
return add_letter(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
"""

# KEYS: the letters, their order, the stats. ARGV: id.
_REMOVE = """
local size = redis.call('HSTRLEN', KEYS[1], ARGV[1])
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'bytes', -size)
return 1
"""


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
    """Earlier deliveries of a message that did not finish."""

    lost: int = 0  # its consumer died holding it
    errors: int = 0  # its handling raised an unexpected error
    worker: str | None = None  # the consumer that was lost last
    lost_at: float | None = None
    last_error: str | None = None

    @property
    def count(self) -> int:
        return self.lost + self.errors

    def describe(self) -> str:
        """What the quarantine records as the message's last error."""
        parts = []
        if self.lost:
            where = f" on {self.worker}" if self.worker else ""
            when = (time.strftime(" at %Y-%m-%dT%H:%M:%SZ", time.gmtime(self.lost_at))
                    if self.lost_at else "")
            parts.append(f"the worker was lost {self.lost} times while processing this "
                         f"message (last{where}{when})")
        if self.errors:
            parts.append(f"its handling failed {self.errors} times")
        if self.last_error:
            parts.append(f"last error: {self.last_error}")
        return "; ".join(parts) or "no delivery finished"


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


def dead_letter(*, payload: Any, code: ErrorCode, error: str, message_id: str | None,
                deliveries: int, queue: str | None, raw_body: bytes | None = None,
                content_type: str | None = None, dedupe_key: str | None = None) -> DeadLetter:
    """A dead letter. With a `dedupe_key` (derived from the message id) its id is stable: a
    message dead-lettered again after a redelivery replaces its entry."""
    letter_id = (hashlib.sha256(dedupe_key.encode()).hexdigest()[:32] if dedupe_key
                 else uuid.uuid4().hex)
    return DeadLetter(
        id=letter_id, message_id=message_id, code=code, error=json_safe(error),
        deliveries=deliveries, payload=json_safe(payload), queue=queue, at=time.time(),
        raw_body=(base64.b64encode(raw_body[:RAW_BODY_LIMIT]).decode()
                  if raw_body is not None else None),
        content_type=content_type)


def _text(raw: bytes | str | None) -> str | None:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


class DeadLetterStore:
    def __init__(self, client: redis.Redis, keys: RedisKeys, *, max_entries: int = MAX_ENTRIES,
                 max_bytes: int = MAX_BYTES) -> None:
        self._redis = client
        self._keys = keys
        self._caps = (max_entries, max_bytes)
        self._order = keys.dead_letter_order
        self._stats = keys.dead_letter_stats
        self._add = client.register_script(_ADD)
        self._remove = client.register_script(_REMOVE)

    @classmethod
    def for_settings(cls, client: redis.Redis, settings: Settings) -> DeadLetterStore:
        return cls(client, RedisKeys(settings.key_prefix),
                   max_entries=settings.dead_letter_max_entries,
                   max_bytes=settings.dead_letter_max_bytes)

    # Delivery records ----------------------------------------------------------------------
    def previous_delivery(self, message_id: str) -> Delivery | None:
        """What earlier, unfinished deliveries of this message left, if any."""
        raw = self._redis.hgetall(self._keys.deliveries(message_id))
        if not raw:
            return None
        lost_at = _text(raw.get(b"lost_at"))
        return Delivery(lost=int(raw.get(b"lost", b"0")), errors=int(raw.get(b"errors", b"0")),
                        worker=_text(raw.get(b"worker")),
                        lost_at=int(lost_at) / 1000 if lost_at else None,
                        last_error=_text(raw.get(b"last_error")))

    def note_error(self, message_id: str, error: str) -> None:
        """A delivery whose handling raised: counted, with its error, for a later quarantine."""
        key = self._keys.deliveries(message_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(key, "errors", 1)
        pipe.hset(key, "last_error", error[:2000])
        pipe.expire(key, DELIVERY_RECORD_TTL_S)
        pipe.execute()

    def end_delivery(self, message_id: str) -> None:
        """The message finished: its earlier unfinished deliveries no longer count."""
        self._redis.delete(self._keys.deliveries(message_id))

    # Dead letters --------------------------------------------------------------------------
    def add(self, **fields: Any) -> DeadLetter:
        """Store a dead letter (the fields of `dead_letter`), trimming the oldest past the
        caps."""
        letter = dead_letter(**fields)
        self._add(keys=[self._keys.dead_letters, self._order, self._stats],
                  args=[letter.id, letter.model_dump_json(), letter.at, *self._caps])
        return letter

    def trimmed(self) -> int:
        """How many letters the caps have trimmed, ever (a purge keeps the count)."""
        return int(self._redis.hget(self._stats, "trimmed") or 0)

    def list(self) -> list[DeadLetter]:
        raw = self._redis.hvals(self._keys.dead_letters)
        return sorted((DeadLetter.model_validate_json(item) for item in raw), key=lambda d: d.at)

    def get(self, letter_id: str) -> DeadLetter | None:
        raw = self._redis.hget(self._keys.dead_letters, letter_id)
        return DeadLetter.model_validate_json(raw) if raw else None

    def remove(self, letter_id: str) -> bool:
        return bool(self._remove(keys=[self._keys.dead_letters, self._order, self._stats],
                                 args=[letter_id]))

    def purge(self) -> int:
        pipe = self._redis.pipeline(transaction=True)
        pipe.hlen(self._keys.dead_letters)
        pipe.delete(self._keys.dead_letters, self._order)
        pipe.hdel(self._stats, "bytes")
        count, *_ = pipe.execute()
        return int(count)


def payload_preview(payload: Any, limit: int = 200) -> str:
    text = json.dumps(payload, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "…"
