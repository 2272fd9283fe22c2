"""Per-job records, row claims and run counters in Redis.

One string per job (schemas/records.py) carries its whole life: `q` when a single submission
is queued (bulk jobs have no record until they settle), `r…` while a shard writer holds its
claim, then the settled record, written once. Each is changed by one Lua script per batch:

- `claim`: a writer claims a batch's jobs for its shard. Done jobs are reported, not claimed;
  a claim younger than the lease held by another shard makes the job busy; an older one (its
  writer died) is taken over, and the caller checks whether the dead shard was committed.
- `settle`: writes the batch's records, and for jobs settled for the first time (never for a
  second delivery) bumps their runs' counters and appends failures to the runs' failure lists.
  A job that another run settled first is counted once in this one too (`run_repeats`).

So a run's counters (schemas/keys.py `run`) stay exact whatever the workers die of, and a
job's status is one GET away.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import redis

from schemas.keys import RedisKeys
from schemas.records import (
    EmbeddingDtype,
    decode_record,
    encode_record,
    record_shard,
    record_status,
    shard_id_of,
)
from schemas.results import JobResult, RunProgress, Status

# Redis answers MGET of this many keys in well under a millisecond.
_READ_CHUNK = 2048

_ENQUEUE = """
local ttl, resend = ARGV[1], ARGV[2] == '1'
local out = {}
for i, key in ipairs(KEYS) do
  local state = string.sub(redis.call('GET', key) or '', 1, 1)
  if state == '' or state == 'f' then
    redis.call('SET', key, 'q', 'EX', ttl)
    out[i] = 1
  else  -- queued, being written or done: a record is never set back
    out[i] = resend and 1 or 0
  end
end
return out
"""

_CLAIM = """
local shard, now, lease, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local out = {}
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  local held, at
  if value then held, at = string.match(value, '^r(.*)|(%d+)$') end
  if value and string.sub(value, 1, 1) == 'd' then
    out[i] = 'done'
  elseif held and held ~= shard and now - tonumber(at) < lease then
    out[i] = 'busy:' .. held .. ':' .. at
  else
    redis.call('SET', key, 'r' .. shard .. '|' .. now, 'PX', ttl)
    out[i] = (held and held ~= shard) and ('taken:' .. held) or 'new'
  end
end
return out
"""

_HOLDS = """
local mine, now = 'r' .. ARGV[1] .. '|', ARGV[2]
local out = {}
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if value and string.sub(value, 1, #mine) == mine then
    redis.call('SET', key, mine .. now, 'KEEPTTL')
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

# Records, each followed by its shard's URI when it is done with a row ('' otherwise): a
# result in one round trip. Offsets: schemas/records.py (flags at 13, shard id at 20).
_READ = """
local prefix, out = ARGV[1], {}
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  local uri = ''
  local done = value and string.sub(value, 1, 1) == 'd'
  if done and math.floor(string.byte(value, 13) / 2) % 2 == 1 then
    local shard = string.sub(value, 21, 20 + string.byte(value, 20))
    uri = redis.call('GET', prefix .. shard) or ''
  end
  out[2 * i - 1] = value or false
  out[2 * i] = uri
end
return out
"""

# KEYS: n records, then per run its counters, failure list and repeats set, then k shards.
# ARGV: ttl, n, runs, k; per job its record, run number (0: none), error code, failure line;
# per shard its URI.
_SETTLE = """
local ttl, n, runs, k = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local counts, failures = {}, {}
local function bump(run, field, by)
  counts[run] = counts[run] or {}
  counts[run][field] = (counts[run][field] or 0) + by
end
local function failed_code(record)  -- schemas/records.py: after tag, time and attempts
  return string.sub(record, 14, 13 + string.byte(record, 13))  -- codes are under 128 bytes
end
local out = {}
for i = 1, n do
  local key, value = KEYS[i], ARGV[4 * i + 1]
  local run, code, line = tonumber(ARGV[4 * i + 2]), ARGV[4 * i + 3], ARGV[4 * i + 4]
  local old = redis.call('GET', key)
  local was, new = old and string.sub(old, 1, 1), string.sub(value, 1, 1)
  local same_run = old and string.sub(old, 2, 5) == string.sub(value, 2, 5)
  if was == 'd' or (was == 'f' and new == 'f') then
    out[i] = 0
    if run > 0 and not same_run and
        redis.call('SADD', KEYS[n + 3 * run], key) == 1 then
      if was == 'd' then
        bump(run, 'done', 1)
      else
        bump(run, 'failed', 1)
        bump(run, 'failed:' .. failed_code(old), 1)
      end
    end
  else
    redis.call('SET', key, value, 'EX', ttl)
    out[i] = 1
    if run > 0 then
      if was == 'f' and same_run then
        bump(run, 'failed', -1)
        bump(run, 'failed:' .. failed_code(old), -1)
      end
      if new == 'd' then
        bump(run, 'done', 1)
      else
        bump(run, 'failed', 1)
        bump(run, 'failed:' .. code, 1)
        failures[run] = failures[run] or {}
        table.insert(failures[run], line)
      end
    end
  end
end
for run = 1, runs do
  local base = n + 3 * (run - 1)
  for field, by in pairs(counts[run] or {}) do
    if by ~= 0 then redis.call('HINCRBY', KEYS[base + 1], field, by) end
  end
  if failures[run] then redis.call('RPUSH', KEYS[base + 2], unpack(failures[run])) end
  for j = 1, 3 do redis.call('EXPIRE', KEYS[base + j], ttl) end
end
for j = 1, k do
  redis.call('SET', KEYS[n + 3 * runs + j], ARGV[4 * n + 4 + j], 'EX', ttl)
end
return out
"""


@dataclass(frozen=True)
class Claim:
    """Outcome of claiming one job for a shard."""

    state: str  # new | taken | done | busy
    previous_shard: str | None = None
    retry_after_s: float = 0.0


@dataclass(frozen=True)
class Settlement:
    """A settled result to record, with the run whose counters it moves."""

    result: JobResult
    run_id: str | None = None
    dtype: EmbeddingDtype = "float32"
    source: str = ""


def _parse_claim(raw: bytes, now_ms: int, lease_ms: int) -> Claim:
    text = raw.decode()
    state, _, rest = text.partition(":")
    if state == "busy":
        shard, _, at = rest.rpartition(":")
        return Claim("busy", shard, max(0.05, (int(at) + lease_ms - now_ms) / 1000))
    if state == "taken":
        return Claim("taken", rest)
    return Claim(state)


def _failure_line(settlement: Settlement) -> str:
    error = settlement.result.error
    source = (settlement.result.source or settlement.source).replace("\t", " ")
    return f"{settlement.result.job_id}\t{error.code.value if error else ''}\t{source}"


class ResultStore:
    def __init__(self, client: redis.Redis, keys: RedisKeys, ttl_s: int) -> None:
        self._redis = client
        self._keys = keys
        self._ttl_s = ttl_s
        self._enqueue_script = client.register_script(_ENQUEUE)
        self._claim_script = client.register_script(_CLAIM)
        self._holds_script = client.register_script(_HOLDS)
        self._read_script = client.register_script(_READ)
        self._settle_script = client.register_script(_SETTLE)

    # Producers -----------------------------------------------------------------------------
    def enqueue(self, job_ids: Sequence[str], *, resend: bool = False) -> list[bool]:
        """Mark single submissions queued, in one round trip; True for each job to send:
        one that is new or failed, or any with `resend` (a record that says queued, being
        written or done stays as it is: a worker skips a done job's copy)."""
        if not job_ids:
            return []
        keys = [self._keys.record(job_id) for job_id in job_ids]
        flags = self._enqueue_script(keys=keys, args=[self._ttl_s, int(resend)])
        return [bool(flag) for flag in flags]

    # Readers -------------------------------------------------------------------------------
    def records(self, job_ids: Sequence[str]) -> list[bytes | None]:
        found: list[bytes | None] = []
        for start in range(0, len(job_ids), _READ_CHUNK):
            chunk = job_ids[start:start + _READ_CHUNK]
            found += cast(list[bytes | None],
                          self._redis.mget([self._keys.record(job_id) for job_id in chunk]))
        return found

    def statuses(self, job_ids: Sequence[str]) -> list[Status | None]:
        return [record_status(raw) for raw in self.records(job_ids)]

    def get(self, job_id: str) -> JobResult | None:
        return self.get_many([job_id])[0]

    def get_many(self, job_ids: Sequence[str]) -> list[JobResult | None]:
        """Results with their shards' URIs, in one round trip per 2,048 jobs."""
        found: list[JobResult | None] = []
        for start in range(0, len(job_ids), _READ_CHUNK):
            chunk = job_ids[start:start + _READ_CHUNK]
            keys = [self._keys.record(job_id) for job_id in chunk]
            flat = self._read_script(keys=keys, args=[self._keys.shard("")])
            for job_id, raw, uri in zip(chunk, flat[::2], flat[1::2], strict=True):
                shard = record_shard(raw) if uri else None
                found.append(decode_record(job_id, raw or None,
                                           {shard: uri.decode()} if shard else None))
        return found

    # Workers -------------------------------------------------------------------------------
    def claim(self, job_ids: Sequence[str], shard: str, lease_s: float) -> list[Claim]:
        if not job_ids:
            return []
        now_ms, lease_ms = int(time.time() * 1000), int(lease_s * 1000)
        keys = [self._keys.record(job_id) for job_id in job_ids]
        raw = self._claim_script(keys=keys, args=[shard, now_ms, lease_ms, self._ttl_s * 1000])
        return [_parse_claim(item, now_ms, lease_ms) for item in raw]

    def still_held(self, job_ids: Sequence[str], shard: str) -> list[bool]:
        """Whether `shard` still holds each claim, renewing those it holds: checked just before
        a shard is committed, so that the commit has a whole lease to land in."""
        if not job_ids:
            return []
        keys = [self._keys.record(job_id) for job_id in job_ids]
        now_ms = int(time.time() * 1000)
        return [bool(flag) for flag in self._holds_script(keys=keys, args=[shard, now_ms])]

    def settle(self, settlements: Sequence[Settlement]) -> list[bool]:
        """Record settled results in one round trip; True for each job settled for the first
        time (its run counted it), False for one an earlier delivery had settled."""
        if not settlements:
            return []
        runs = list(dict.fromkeys(s.run_id for s in settlements if s.run_id))
        run_number = {run_id: i + 1 for i, run_id in enumerate(runs)}
        shards = {shard_id_of(s.result.output.shard): s.result.output.shard
                  for s in settlements if s.result.output is not None}
        keys = [self._keys.record(s.result.job_id) for s in settlements]
        for run_id in runs:
            keys += [self._keys.run(run_id), self._keys.run_failures(run_id),
                     self._keys.run_repeats(run_id)]
        keys += [self._keys.shard(shard_id) for shard_id in shards]
        args: list[str | bytes | int] = [self._ttl_s, len(settlements), len(runs), len(shards)]
        for s in settlements:
            error = s.result.error
            args += [encode_record(s.result, s.run_id, s.dtype),
                     run_number.get(s.run_id or "", 0),
                     error.code.value if error else "", _failure_line(s)]
        args += list(shards.values())
        return [bool(flag) for flag in self._settle_script(keys=keys, args=args)]


class RunStore:
    """A run's counters and failure list, as producers and `dualstream status` read them."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, ttl_s: int) -> None:
        self._redis = client
        self._keys = keys
        self._ttl_s = ttl_s

    def queued(self, run_id: str, count: int, cursor: str | None = None) -> None:
        """Count jobs just published under the run; `cursor`: the last source they listed."""
        key = self._keys.run(run_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(key, "queued", count)
        if cursor is not None:
            pipe.hset(key, "cursor", cursor)
        pipe.expire(key, self._ttl_s)
        pipe.execute()

    def listed(self, run_id: str) -> None:
        """The producer published every job of this pass."""
        self._redis.hset(self._keys.run(run_id), "listed", 1)

    def new_pass(self, run_id: str) -> int:
        """Start the run over: counters and cursor reset, the failure list kept as history."""
        key = self._keys.run(run_id)
        previous = self.progress(run_id).passes
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(key, self._keys.run_repeats(run_id))
        pipe.hset(key, mapping={"pass": previous + 1, "queued": 0, "done": 0, "failed": 0,
                                "started_at": int(time.time())})
        pipe.expire(key, self._ttl_s)
        pipe.execute()
        return previous + 1

    def progress(self, run_id: str) -> RunProgress:
        raw = cast(dict[bytes, bytes], self._redis.hgetall(self._keys.run(run_id)))
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        return RunProgress.from_fields(run_id, fields)

    def failures(self, run_id: str, limit: int = 1000) -> list[tuple[str, str, str]]:
        """(job id, code, source) of a run's failed jobs, oldest first."""
        lines = cast(list[bytes], self._redis.lrange(self._keys.run_failures(run_id), 0,
                                                     limit - 1))
        return [(job_id, code, source) for job_id, code, source
                in (line.decode().split("\t", 2) for line in lines)]
