"""The dead-letter store: messages that failed for good, kept in Redis for an operator.

Each entry holds the original payload, the error code and message, and how many times it was
delivered. `dualstream dlq list|show|replay|purge` manages them; replay re-sends the payload.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis
from pydantic import BaseModel

from schemas.errors import ErrorCode
from schemas.keys import RedisKeys

DELIVERY_COUNT_TTL_S = 24 * 3600


class DeadLetter(BaseModel):
    id: str
    message_id: str | None
    code: ErrorCode
    error: str
    deliveries: int
    payload: Any
    queue: str | None = None
    at: float


class DeadLetterStore:
    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self._redis = client
        self._keys = keys

    def count_delivery(self, message_id: str) -> int:
        """Counts starts of a message that have not ended; a crash leaves the count standing."""
        key = self._keys.deliveries(message_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, DELIVERY_COUNT_TTL_S)
        count, _ = pipe.execute()
        return int(count)

    def end_delivery(self, message_id: str) -> None:
        self._redis.delete(self._keys.deliveries(message_id))

    def add(self, *, payload: Any, code: ErrorCode, error: str, message_id: str | None,
            deliveries: int, queue: str | None) -> DeadLetter:
        letter = DeadLetter(id=uuid.uuid4().hex, message_id=message_id, code=code, error=error,
                            deliveries=deliveries, payload=payload, queue=queue, at=time.time())
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
        count = int(self._redis.hlen(self._keys.dead_letters))
        self._redis.delete(self._keys.dead_letters)
        return count


def payload_preview(payload: Any, limit: int = 200) -> str:
    text = json.dumps(payload, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "…"
