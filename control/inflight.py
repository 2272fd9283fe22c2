"""Where a message is while a consumer holds it, and how it comes back when the consumer dies.

At every instant a message is in exactly one place: its queue, one consumer's in-flight list,
or gone because it was settled (acknowledged after its outcome was written). Each move between
two places is one atomic Redis operation:

- fetch:    `BLMOVE queue inflight RIGHT LEFT`, done by the consumer's transport
            (`control/transport.py`): the message is recorded as held by the same command that
            takes it, so no instant exists at which a killed consumer could lose it;
- ack:      `LREM inflight 1 <message>`, once the message's outcome is written;
- requeue:  one script: `LREM inflight` then `LPUSH`/`RPUSH queue` (only if it was held);
- recover:  one script per sweep: every in-flight list whose consumer's heartbeat is older than
            `heartbeat_ttl_s` is moved back onto its queue, message by message, and each
            message's count of lost deliveries goes up by one.

A message that goes back onto its queue (requeued or recovered) is marked redelivered: its
JSON gains a first key, `REDELIVERED_KEY`, which the transport turns into kombu's
`delivery_info.redelivered`. Only such a message (or a retry) can have a delivery record, so a
worker reads delivery records for those alone (`worker/message_policy.py`): a first delivery
costs no Redis read for it.

A consumer is alive while it refreshes its heartbeat: its in-flight list's score in one sorted
set (`RedisKeys.consumers`), set from the Redis server's clock, every `heartbeat_interval_s`.
Any process may sweep (workers do, after every heartbeat); the sweep takes no lock, so no
process, dead or alive, can hold recovery up. A consumer's index entry outlives its death by
`FORGET_AFTER_MS`, so a consumer that was only cut off (its messages swept meanwhile) and then
fetches once more before its next heartbeat is still found if it dies right then.

Why lists and not Redis Streams: Celery's consumer, task protocol and signals stay as they are
(only the fetch, ack and restore of kombu's Redis transport change), each queued message costs
one list element, and the queue stays a list that `LLEN`, KEDA's `redis` scaler and every
operator tool read. docs/reliability.md gives the bounds and the tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import redis

from control.deadletters import (
    ADD_LETTER_LUA,
    DELIVERY_RECORD_TTL_S,
    MAX_BYTES,
    MAX_ENTRIES,
)
from schemas.keys import RedisKeys

log = logging.getLogger(__name__)

# An index entry of a dead consumer is forgotten after this long (its list is empty by then).
FORGET_AFTER_MS = 3_600_000

REDELIVERED_KEY = "x-dualstream-redelivered"
_MARK = '{"' + REDELIVERED_KEY + '":1,'
# A message put back on its queue, marked (once) as redelivered: an element that is not a
# JSON object with a key (it is dead-lettered at its next fetch) is put back as it is.
_MARK_LUA = """
local function redelivered(raw)
  if string.sub(raw, 1, MARK_LENGTH) == 'MARK' or not string.find(raw, '^{%s*"') then
    return raw
  end
  return 'MARK' .. string.sub(raw, 2)
end
""".replace("MARK_LENGTH", str(len(_MARK))).replace("MARK", _MARK)

_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #ARGV do
  redis.call('ZADD', KEYS[1], now, ARGV[i])
end
return now
"""

# KEYS: the consumer index, the time of the last sweep. ARGV: heartbeat ttl (ms), forget-after
# (ms), the key prefix of delivery records, their ttl (s). The queue is the part of the in-flight
# key after its last '|'. When nobody swept for a ttl (Redis was down, or no consumer ran), no
# consumer could beat either: each gets a ttl from now before it counts as dead.
_SWEEP = _MARK_LUA + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl, forget = tonumber(ARGV[1]), tonumber(ARGV[2])
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('SET', KEYS[2], now)
if now - last > ttl then
  for _, inflight in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    redis.call('ZADD', KEYS[1], 'XX', now, inflight)
  end
  return 0
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - ttl, 'WITHSCORES')
local moved = 0
for i = 1, #dead, 2 do
  local inflight, seen = dead[i], tonumber(dead[i + 1])
  local queue = string.match(inflight, '^.*|(.*)$')
  local held = redis.call('LRANGE', inflight, 0, -1)
  for j = 1, #held do  -- newest first, so the oldest ends up next to be taken
    local raw = held[j]
    redis.call('RPUSH', queue, redelivered(raw))
    local ok, message = pcall(cjson.decode, raw)
    if ok and type(message) == 'table' and type(message['headers']) == 'table'
        and type(message['headers']['id']) == 'string' then
      local record = ARGV[3] .. message['headers']['id']
      redis.call('HINCRBY', record, 'lost', 1)
      redis.call('HSET', record, 'worker', string.match(inflight, '|(.*)|'), 'lost_at', now)
      redis.call('EXPIRE', record, tonumber(ARGV[4]))
    end
  end
  moved = moved + #held
  redis.call('DEL', inflight)
  if now - seen > forget then
    redis.call('ZREM', KEYS[1], inflight)
  end
end
return moved
"""

# KEYS: the in-flight list, the queue. ARGV: the message, 1 to put it at the front.
_REQUEUE = _MARK_LUA + """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  if ARGV[2] == '1' then
    redis.call('RPUSH', KEYS[2], redelivered(ARGV[1]))
  else
    redis.call('LPUSH', KEYS[2], redelivered(ARGV[1]))
  end
  return 1
end
return 0
"""


# KEYS: the in-flight list, the dead-letter hash. ARGV: the message, the letter's id and body.
# KEYS: the in-flight list, the letters, their order, their stats. ARGV: the message, the
# letter's id, the letter, time, max entries, max bytes.
_BURY = ADD_LETTER_LUA + """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  add_letter(KEYS[2], KEYS[3], KEYS[4], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
  return 1
end
return 0
"""


class InflightLedger:
    """The ack, requeue, heartbeat and sweep operations, on one Redis client."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, *, heartbeat_ttl_s: float,
                 dead_letter_caps: tuple[int, int] = (MAX_ENTRIES, MAX_BYTES)) -> None:
        self._redis = client
        self._keys = keys
        self._dead_letter_caps = dead_letter_caps
        self._ttl_ms = int(heartbeat_ttl_s * 1000)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._sweep = client.register_script(_SWEEP)
        self._requeue = client.register_script(_REQUEUE)
        self._bury = client.register_script(_BURY)

    def ack(self, inflight: str, raw: bytes) -> bool:
        """The message's outcome is written: it leaves its consumer's list for good."""
        return bool(self._redis.lrem(inflight, 1, raw))  # type: ignore[arg-type] # bytes too

    def requeue(self, inflight: str, queue: str, raw: bytes, *, front: bool) -> bool:
        """Back onto its queue, at the front (next to be taken) or the back; False when the
        consumer no longer held it (a sweep had already put it back)."""
        return bool(self._requeue(keys=[inflight, queue], args=[raw, "1" if front else "0"]))

    def bury(self, inflight: str, raw: bytes, letter_id: str, letter: str) -> bool:
        """A message that cannot be delivered at all leaves its list for the dead-letter store,
        in one step."""
        keys = self._keys
        return bool(self._bury(
            keys=[inflight, keys.dead_letters, keys.dead_letter_order, keys.dead_letter_stats],
            args=[raw, letter_id, letter, time.time(), *self._dead_letter_caps]))

    def beat(self, inflight_keys: Iterable[str]) -> None:
        keys = list(inflight_keys)
        if keys:
            self._heartbeat(keys=[self._keys.consumers], args=keys)

    def sweep(self) -> int:
        """Put back what dead consumers held; returns how many messages moved."""
        return int(self._sweep(keys=[self._keys.consumers, self._keys.last_sweep], args=[
            self._ttl_ms, FORGET_AFTER_MS, self._keys.deliveries(""), DELIVERY_RECORD_TTL_S]))

    def listed(self, inflight: str) -> list[bytes]:
        return list(self._redis.lrange(inflight, 0, -1))  # type: ignore[arg-type]

    def held(self, queue: str) -> int:
        """Messages of `queue` that consumers hold now, dead ones included until swept."""
        lists: list[bytes] = self._redis.zrange(self._keys.consumers, 0, -1)  # type: ignore[assignment]
        mine = [key for key in lists if key.decode().rpartition("|")[2] == queue]
        pipe = self._redis.pipeline(transaction=False)
        for key in mine:
            pipe.llen(key)
        return int(sum(pipe.execute()))


class Sweeper:
    """A thread that sweeps dead consumers' lists every interval: in every consumer (as part of
    its heartbeat) and on its own in processes that hold nothing themselves (a worker while its
    model loads, a restorer beside the API), so that their messages come back even when no
    consumer runs. Failures (Redis away) are logged and retried on the next round."""

    def __init__(self, ledger: InflightLedger, *, interval_s: float,
                 name: str = "ds-sweeper") -> None:
        self._ledger = ledger
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Sweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _finished(self) -> bool:
        return False

    def _round(self) -> int:
        return self._ledger.sweep()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s) and not self._finished():
            try:
                moved = self._round()
            except Exception as exc:  # noqa: BLE001 - a thread that dies would stop beating
                log.warning("%s failed (retried in %.1f s): %s: %s", self._thread.name,
                            self._interval_s, type(exc).__name__, exc)
                continue
            if moved:
                log.warning("put %d messages of dead consumers back on their queues", moved)


class Heartbeat(Sweeper):
    """A consumer's sweeper that also keeps its in-flight lists alive and reconciles them with
    what the consumer holds.

    It runs apart from Celery's event loop, so a busy loop cannot make a live consumer look
    dead.
    """

    def __init__(self, ledger: InflightLedger, inflight_keys: Callable[[], Iterable[str]],
                 *, interval_s: float, name: str,
                 reconcile: Callable[[], None] = lambda: None) -> None:
        super().__init__(ledger, interval_s=interval_s, name=name)
        self._inflight_keys = inflight_keys
        self._reconcile = reconcile
        self._done: Callable[[], bool] = lambda: False
        self._retire_by = float("inf")

    def start(self) -> Heartbeat:
        self.beat_once()
        super().start()
        return self

    def beat_once(self) -> None:
        self._ledger.beat(self._inflight_keys())

    def retire(self, done: Callable[[], bool], within_s: float) -> None:
        """Keep beating until `done()` (what the consumer still holds was settled) or for at
        most `within_s`; then stop, and let a sweep take what is left."""
        self._done = done
        self._retire_by = time.monotonic() + within_s

    def _finished(self) -> bool:
        return self._done() or time.monotonic() > self._retire_by

    def _round(self) -> int:
        self.beat_once()
        self._reconcile()
        return super()._round()
