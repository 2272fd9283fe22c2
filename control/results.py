"""Per-job results and idempotency claims in Redis.

A result is a hash `{status, body}` with a TTL; `body` is a `JobResult` as JSON. A claim is a
hash `{shard, at}` that says which output shard is writing a job's row right now. Claims are
taken with one Lua script per batch, so two workers racing on the same job cannot both win,
and a claim older than the lease (its writer died) can be taken over.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import redis

from schemas.keys import RedisKeys
from schemas.results import JobResult, Status

_CLAIM = """
local shard, now, lease, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
for i = 1, #KEYS, 2 do
  local result_key, claim_key = KEYS[i], KEYS[i + 1]
  if redis.call('HGET', result_key, 'status') == 'done' then
    table.insert(out, 'done')
  else
    local held = redis.call('HMGET', claim_key, 'shard', 'at')
    if held[1] and held[1] ~= shard and now - tonumber(held[2]) < lease then
      table.insert(out, 'busy:' .. held[1] .. ':' .. held[2])
    else
      redis.call('HSET', claim_key, 'shard', shard, 'at', now)
      redis.call('PEXPIRE', claim_key, ttl)
      if held[1] and held[1] ~= shard then
        table.insert(out, 'taken:' .. held[1])
      else
        table.insert(out, 'new')
      end
    end
  end
end
return out
"""

_HOLDS = """
local shard, now = ARGV[1], ARGV[2]
local out = {}
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], 'shard') == shard then
    redis.call('HSET', KEYS[i], 'at', now)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""


@dataclass(frozen=True)
class Claim:
    """Outcome of claiming one job for a shard."""

    state: str  # new | taken | done | busy
    previous_shard: str | None = None
    retry_after_s: float = 0.0


def _parse_claim(raw: bytes, now_ms: int, lease_ms: int) -> Claim:
    text = raw.decode()
    state, _, rest = text.partition(":")
    if state == "busy":
        shard, _, at = rest.rpartition(":")
        return Claim("busy", shard, max(0.05, (int(at) + lease_ms - now_ms) / 1000))
    if state == "taken":
        return Claim("taken", rest)
    return Claim(state)


def _decode_result(status: bytes | None, body: bytes | None) -> JobResult | None:
    """The hash's `status` field is authoritative: it moves without rewriting the body."""
    if not body:
        return None
    result = JobResult.model_validate_json(body)
    return result.model_copy(update={"status": Status(status.decode())}) if status else result


class ResultStore:
    def __init__(self, client: redis.Redis, keys: RedisKeys, ttl_s: int) -> None:
        self._redis = client
        self._keys = keys
        self._ttl_s = ttl_s
        self._claim_script = client.register_script(_CLAIM)
        self._holds_script = client.register_script(_HOLDS)
        self._begin_script = client.register_script(_BEGIN)
        self._requeued_script = client.register_script(_REQUEUED)

    # Results -----------------------------------------------------------------------------
    def put_many(self, results: Iterable[JobResult], *, clear_claims: bool = False) -> None:
        pipe = self._redis.pipeline(transaction=True)
        for result in results:
            key = self._keys.result(result.job_id)
            pipe.hset(key, mapping={"status": result.status.value,
                                    "body": result.model_dump_json()})
            pipe.expire(key, self._ttl_s)
            if clear_claims:
                pipe.delete(self._keys.claim(result.job_id))
        pipe.execute()

    def mark_queued(self, results: Sequence[JobResult]) -> list[bool]:
        """Record jobs as queued unless a result already exists; True where newly queued."""
        pipe = self._redis.pipeline(transaction=False)
        for result in results:
            key = self._keys.result(result.job_id)
            pipe.hsetnx(key, "status", Status.QUEUED.value)
        fresh = pipe.execute()
        pipe = self._redis.pipeline(transaction=False)
        for result, is_new in zip(results, fresh, strict=True):
            if is_new:
                key = self._keys.result(result.job_id)
                pipe.hset(key, "body", result.model_dump_json())
                pipe.expire(key, self._ttl_s)
        pipe.execute()
        return [bool(flag) for flag in fresh]

    def begin(self, job_ids: Sequence[str]) -> list[bool]:
        """Mark jobs running, in one round trip; True for jobs that are already done."""
        if not job_ids:
            return []
        keys = [self._keys.result(job_id) for job_id in job_ids]
        return [raw == b"done" for raw in self._begin_script(keys=keys, args=[self._ttl_s])]

    def requeued(self, job_ids: Sequence[str]) -> None:
        """Jobs whose message went back on the queue unfinished: `running` becomes `queued`."""
        if job_ids:
            self._requeued_script(keys=[self._keys.result(job_id) for job_id in job_ids])

    def statuses(self, job_ids: Sequence[str]) -> list[Status | None]:
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self._keys.result(job_id), "status")
        return [Status(raw.decode()) if raw else None for raw in pipe.execute()]

    def get(self, job_id: str) -> JobResult | None:
        return self.get_many([job_id])[0]

    def get_many(self, job_ids: Sequence[str]) -> list[JobResult | None]:
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self._keys.result(job_id), "status", "body")
        return [_decode_result(status, body) for status, body in pipe.execute()]

    # Claims ------------------------------------------------------------------------------
    def claim(self, job_ids: Sequence[str], shard: str, lease_s: float) -> list[Claim]:
        if not job_ids:
            return []
        now_ms, lease_ms = int(time.time() * 1000), int(lease_s * 1000)
        keys: list[str] = []
        for job_id in job_ids:
            keys += [self._keys.result(job_id), self._keys.claim(job_id)]
        raw = self._claim_script(keys=keys, args=[shard, now_ms, lease_ms, self._ttl_s * 1000])
        return [_parse_claim(item, now_ms, lease_ms) for item in raw]

    def still_held(self, job_ids: Sequence[str], shard: str) -> list[bool]:
        """Whether `shard` still holds each claim, renewing those it holds: checked just before
        a shard is committed, so that the commit has a whole lease to land in."""
        if not job_ids:
            return []
        keys = [self._keys.claim(job_id) for job_id in job_ids]
        now_ms = int(time.time() * 1000)
        return [bool(flag) for flag in self._holds_script(keys=keys, args=[shard, now_ms])]


_BEGIN = """
local out = {}
for i = 1, #KEYS do
  local status = redis.call('HGET', KEYS[i], 'status')
  if status ~= 'done' then
    redis.call('HSET', KEYS[i], 'status', 'running')
    redis.call('EXPIRE', KEYS[i], ARGV[1])
  end
  out[i] = status or ''
end
return out
"""

_REQUEUED = """
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], 'status') == 'running' then
    redis.call('HSET', KEYS[i], 'status', 'queued')
  end
end
return 0
"""
