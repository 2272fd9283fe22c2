"""Per-job records, row reservations and run counters in Redis.

One string per job (schemas/records.py) carries its whole life: `q` when a single submission
is queued (by the publish script, control/publish.py; bulk jobs have nothing until their row
is reserved), then its result, written once, by the shard writer that reserves the job's
row, before the row is written. A done record
names its shard and row, and counts as done once that shard is committed: `ds:shard:<id>`
holds the shard's URI from the moment its manifest is written. Until then it is the job's
claim: another writer finds it busy, or, once its lease is over, takes it over after checking
whether the dead writer's shard was committed after all. Each step is one Lua script per batch:

- `reserve`: one `SET NX` per bulk job (its row number comes back); a job with a record is
  looked at: done (its shard is committed), busy, or taken over. The rows are numbered as they
  are won. What the jobs add to their runs' counters is kept with the shard
  (`ds:shardruns:<id>`) until it is committed.
- `commit`: sets the shard's key, once, and only then adds its counts to the runs: a job is
  counted when its row is committed, once, whoever commits it (its writer, or the writer that
  finds a dead one's shard committed).
- `fail`: records failed jobs and counts them (a job whose row is done is left as it is).

A reservation taken over (or failed) after its lease revokes its shard: the shard's key is set
to '' so the first writer's commit, if it was only slow, fails and nothing counts twice.

So a run's counters stay exact whatever the workers die of, a bulk job costs Redis one write,
and a job's status is one read away.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import redis

from schemas.keys import RedisKeys
from schemas.records import (
    TIME_ORIGIN_MS,
    decode_record,
    encode_record,
    record_status,
    run_tag,
    with_row,
)
from schemas.results import JobResult, RunProgress, Status

# Redis answers this many keys at once in well under a millisecond.
_READ_CHUNK = 2048

# Offsets in a record (schemas/records.py), from 1: run tag 2-4, time 5-9 (ms since
# 2020-01-01), row 14-15, the shard id's length at 16 (ids are under 128 bytes) and the id
# from 17; a failed record's code's length at 11, the code from 12.
_RECORD_LUA = """
local function shard_of(record)
  return string.sub(record, 17, 16 + string.byte(record, 16))
end
local function time_of(record)
  return struct.unpack('<I5', string.sub(record, 5, 9)) + ORIGIN
end
local function with_row(record, row)
  return string.sub(record, 1, 13) .. struct.pack('<I2', row) .. string.sub(record, 16)
end
local function failed_code(record)
  return string.sub(record, 12, 11 + string.byte(record, 11))
end
local function same_run(a, b)
  return string.sub(a, 2, 4) == string.sub(b, 2, 4)
end
-- A shard's key holds its URI once committed, or '' once revoked (see `revoke`).
local function committed(shard_key)
  local uri = redis.call('GET', shard_key)
  return uri and uri ~= ''
end
-- A writer whose reservation is taken from it must not commit its shard afterwards: its
-- key is set to '' first, so that the shard's own `SET NX` at commit fails.
local function revoke(shard_key, ttl)
  redis.call('SET', shard_key, '', 'NX', 'EX', ttl)
end
""".replace("ORIGIN", str(TIME_ORIGIN_MS))

# KEYS: n records, the shard's pending counts, then per run its counters and repeats set.
# ARGV: shard id, now (ms), lease (ms), ttl (s), first row, takeover (1/0), n, runs, the
# shard key prefix, each job's run number as 2 bytes, big-endian (0: none); per job its
# record; per run its id.
_RESERVE = _RECORD_LUA + """
local shard, now, lease, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local row, takeover, n, runs = tonumber(ARGV[5]), ARGV[6] == '1', tonumber(ARGV[7]),
  tonumber(ARGV[8])
local first_row = row
local shard_prefix = ARGV[9]
local won, out = {}, {}
local function win(i, key, record, run, old)
  redis.call('SET', key, with_row(record, row), 'EX', ttl)
  out[i] = row
  row = row + 1
  if run > 0 then
    won[run] = (won[run] or 0) + 1
    if old and string.sub(old, 1, 1) == 'f' and #old >= 12 then
      -- A failure this run counted gives way at once, whether or not this shard commits:
      -- whatever settles the job next counts it again.
      local counted = same_run(old, record) or
        redis.call('SREM', KEYS[n + 1 + 2 * run], key) == 1
      if counted then
        redis.call('HINCRBY', KEYS[n + 2 * run], 'failed', -1)
        redis.call('HINCRBY', KEYS[n + 2 * run], 'failed:' .. failed_code(old), -1)
      end
    end
  end
end
for i = 1, n do
  local key, record = KEYS[i], ARGV[10 + i]
  local high, low = string.byte(ARGV[10], 2 * i - 1, 2 * i)
  local run = high * 256 + low
  -- Records come numbered as if every row were won; only those after a lost one change.
  if redis.call('SET', key, row == first_row + i - 1 and record or with_row(record, row),
                'NX', 'EX', ttl) then
    out[i] = row  -- the common case: a job with no record yet
    row = row + 1
    if run > 0 then won[run] = (won[run] or 0) + 1 end
  else
    local old = redis.call('GET', key)
    local state = old and string.sub(old, 1, 1)
    if state ~= 'd' or #old < 17 then
      win(i, key, record, run, old)
    else
      local held = shard_of(old)
      if held == shard then
        -- This call's own, from its fast path or from this script sent twice: numbered and
        -- counted again, as the counts below are set, not added.
        win(i, key, record, run, nil)
      elseif committed(shard_prefix .. held) then
        out[i] = 'done'
        if run > 0 and not same_run(old, record) and
            redis.call('SADD', KEYS[n + 1 + 2 * run], key) == 1 then
          redis.call('HINCRBY', KEYS[n + 2 * run], 'done', 1)
          redis.call('EXPIRE', KEYS[n + 2 * run], ttl)
          redis.call('EXPIRE', KEYS[n + 1 + 2 * run], ttl)
        end
      elseif now - time_of(old) < lease then
        out[i] = 'busy:' .. held .. ':' .. time_of(old)
      elseif takeover then
        revoke(shard_prefix .. held, ttl)
        win(i, key, record, run, nil)
      else
        out[i] = 'taken:' .. held
      end
    end
  end
end
if runs > 0 then
  local call = '\tdone\t' .. ARGV[5] .. ':' .. ARGV[6]
  for run = 1, runs do
    redis.call('HSET', KEYS[n + 1], ARGV[10 + n + run] .. call, won[run] or 0)
  end
  redis.call('EXPIRE', KEYS[n + 1], ttl)
end
return out
"""

# KEYS: the shard's key, its pending counts. ARGV: its URI, ttl (s), the run key prefix.
# Run keys are named from the pending counts, so this script is for one Redis, not a cluster.
# Returns 1 when committed now, 2 when it was already, 0 when the shard was revoked.
_COMMIT = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  if redis.call('GET', KEYS[1]) == '' then return 0 end
  return 2
end
local counts = redis.call('HGETALL', KEYS[2])
for j = 1, #counts, 2 do
  -- `run \t field \t call` (one reservation call's count), or `run \t field`.
  local run, field = string.match(counts[j], '^([^\t]*)\t([^\t]*)')
  if counts[j + 1] ~= '0' then
    redis.call('HINCRBY', ARGV[3] .. run, field, counts[j + 1])
    redis.call('EXPIRE', ARGV[3] .. run, ARGV[2])
  end
end
redis.call('DEL', KEYS[2])
return 1
"""

# Renews (and reports) the reservations `shard` still holds: KEYS records; ARGV shard, now.
_HOLDS = (_RECORD_LUA + """
local shard, now = ARGV[1], struct.pack('<I5', tonumber(ARGV[2]) - ORIGIN)
local out = {}
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if value and string.sub(value, 1, 1) == 'd' and shard_of(value) == shard then
    redis.call('SET', key, string.sub(value, 1, 4) .. now .. string.sub(value, 10), 'KEEPTTL')
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
""").replace("ORIGIN", str(TIME_ORIGIN_MS))

# Drops the reservations `shard` still holds (its write failed): KEYS records; ARGV shard.
_RELEASE = _RECORD_LUA + """
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if value and string.sub(value, 1, 1) == 'd' and shard_of(value) == ARGV[1] then
    redis.call('DEL', key)
  end
end
return 0
"""

# Jobs of a run found settled by another run, outside a reservation (a redelivery's recheck,
# the same job twice in one batch): each counted once in this run. KEYS: records, then the
# run's counters and repeats set. ARGV: the run's tag, ttl, shard key prefix.
_REPEATS = _RECORD_LUA + """
local tag, ttl, prefix = ARGV[1], ARGV[2], ARGV[3]
local n = #KEYS - 2
local counters, repeats = KEYS[n + 1], KEYS[n + 2]
local added = 0
for i = 1, n do
  local old = redis.call('GET', KEYS[i])
  local state = old and string.sub(old, 1, 1)
  local done = state == 'd' and #old >= 17 and committed(prefix .. shard_of(old))
  local failed = state == 'f' and #old >= 12
  if (done or failed) and string.sub(old, 2, 4) ~= tag and
      redis.call('SADD', repeats, KEYS[i]) == 1 then
    if done then
      redis.call('HINCRBY', counters, 'done', 1)
    else
      redis.call('HINCRBY', counters, 'failed', 1)
      redis.call('HINCRBY', counters, 'failed:' .. failed_code(old), 1)
    end
    added = added + 1
  end
end
if added > 0 then
  redis.call('EXPIRE', counters, ttl)
  redis.call('EXPIRE', repeats, ttl)
end
return added
"""

# Each record, then its shard's URI when the shard is committed ('' otherwise).
_READ = _RECORD_LUA + """
local prefix, out = ARGV[1], {}
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  local uri = ''
  if value and string.sub(value, 1, 1) == 'd' then
    uri = redis.call('GET', prefix .. shard_of(value)) or ''
  end
  out[2 * i - 1] = value or false
  out[2 * i] = uri
end
return out
"""

# KEYS: n records, then per run its counters, failure list and repeats set.
# ARGV: ttl, n, runs, shard key prefix, now (ms), lease (ms); per job its record, run number
# (0: none), error code, failure line.
_FAIL = _RECORD_LUA + """
local ttl, n, runs, shard_prefix = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local now, lease = tonumber(ARGV[5]), tonumber(ARGV[6])
local counts, failures, out = {}, {}, {}
local function bump(run, field, by)
  counts[run] = counts[run] or {}
  counts[run][field] = (counts[run][field] or 0) + by
end
for i = 1, n do
  local key, value = KEYS[i], ARGV[4 * i + 3]
  local run, code, line = tonumber(ARGV[4 * i + 4]), ARGV[4 * i + 5], ARGV[4 * i + 6]
  local old = redis.call('GET', key)
  local was = old and string.sub(old, 1, 1)
  local same = old and same_run(old, value)
  local whole = was == 'd' and #old >= 17
  local done = whole and committed(shard_prefix .. shard_of(old))
  local held = whole and not done and now - time_of(old) < lease
  if done or held or (was == 'f' and #old >= 12) then
    out[i] = 0  -- done, being written by a live writer, or failed already
    if run > 0 and not same and (done or was == 'f') and
        redis.call('SADD', KEYS[n + 3 * run], key) == 1 then
      if done then
        bump(run, 'done', 1)
      else
        bump(run, 'failed', 1)
        bump(run, 'failed:' .. failed_code(old), 1)
      end
    end
  else
    if whole then revoke(shard_prefix .. shard_of(old), ttl) end  -- a dead writer's
    redis.call('SET', key, value, 'EX', ttl)
    out[i] = 1
    if run > 0 then
      bump(run, 'failed', 1)
      bump(run, 'failed:' .. code, 1)
      failures[run] = failures[run] or {}
      table.insert(failures[run], line)
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
return out
"""


class Commit(enum.Enum):
    COMMITTED = "committed"  # now, by this call: its counts went to its runs
    ALREADY = "already"  # by an earlier call
    REVOKED = "revoked"  # never: its rows are another writer's now


@dataclass(frozen=True)
class Claim:
    """Outcome of reserving one job's row for a shard."""

    state: str  # new | taken | done | busy
    previous_shard: str | None = None
    retry_after_s: float = 0.0
    row: int | None = None  # new: the job's row in the shard


@dataclass(frozen=True)
class Reservation:
    """A row a shard writer wants: the job, and the record it leaves once the shard commits
    (encoded with this shard; its row is filled in when the row is won)."""

    job_id: str
    record: bytes
    run_id: str | None = None


@dataclass(frozen=True)
class Settlement:
    """A failed result to record, with the run whose counters it moves."""

    result: JobResult
    run_id: str | None = None
    source: str = ""


def _parse_claim(raw: bytes | int, now_ms: int, lease_ms: int) -> Claim:
    if isinstance(raw, int):
        return Claim("new", row=raw)
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


def _runs(run_ids: Sequence[str | None]) -> tuple[list[str], dict[str, int]]:
    runs = list(dict.fromkeys(run_id for run_id in run_ids if run_id))
    return runs, {run_id: i + 1 for i, run_id in enumerate(runs)}


class ResultStore:
    def __init__(self, client: redis.Redis, keys: RedisKeys, ttl_s: int,
                 lease_s: float = 120.0) -> None:
        self._redis = client
        self._keys = keys
        self._ttl_s = ttl_s
        self._lease_s = lease_s  # settings.claim_lease_s, for `fail`
        self._reserve_script = client.register_script(_RESERVE)
        self._commit_script = client.register_script(_COMMIT)
        self._holds_script = client.register_script(_HOLDS)
        self._release_script = client.register_script(_RELEASE)
        self._read_script = client.register_script(_READ)
        self._fail_script = client.register_script(_FAIL)
        self._repeats_script = client.register_script(_REPEATS)

    # Producers -----------------------------------------------------------------------------
    def records(self, job_ids: Sequence[str]) -> list[bytes | None]:
        """Each job's record as it is (schemas/records.py), in one MGET per 2,048 jobs."""
        found: list[bytes | None] = []
        for start in range(0, len(job_ids), _READ_CHUNK):
            chunk = job_ids[start:start + _READ_CHUNK]
            found += cast(list[bytes | None],
                          self._redis.mget([self._keys.record(job_id) for job_id in chunk]))
        return found

    # Readers -------------------------------------------------------------------------------
    def _read(self, job_ids: Sequence[str]) -> list[tuple[bytes | None, str | None]]:
        found: list[tuple[bytes | None, str | None]] = []
        for start in range(0, len(job_ids), _READ_CHUNK):
            chunk = job_ids[start:start + _READ_CHUNK]
            keys = [self._keys.record(job_id) for job_id in chunk]
            flat = self._read_script(keys=keys, args=[self._keys.shard("")])
            found += [(raw or None, uri.decode() if uri else None)
                      for raw, uri in zip(flat[::2], flat[1::2], strict=True)]
        return found

    def statuses(self, job_ids: Sequence[str]) -> list[Status | None]:
        """Each job's status: done only once its row is committed."""
        return [Status.RUNNING if status is Status.DONE and uri is None else status
                for status, uri in ((record_status(raw), uri)
                                    for raw, uri in self._read(job_ids))]

    def get(self, job_id: str) -> JobResult | None:
        return self.get_many([job_id])[0]

    def get_many(self, job_ids: Sequence[str]) -> list[JobResult | None]:
        """Results with their shards' URIs, in one round trip per 2,048 jobs."""
        return [decode_record(job_id, raw, uri)
                for job_id, (raw, uri) in zip(job_ids, self._read(job_ids), strict=True)]

    # Shard writers -------------------------------------------------------------------------
    def reserve(self, reservations: Sequence[Reservation], shard: str, lease_s: float, *,
                first_row: int = 0, takeover: bool = False) -> list[Claim]:
        """Reserve the jobs' rows in `shard` in one round trip, numbering the rows won from
        `first_row`. With `takeover`, a reservation older than the lease whose shard is not
        committed is taken (after the caller has checked that shard's manifest)."""
        if not reservations:
            return []
        if not takeover and all(r.run_id for r in reservations):
            fresh = self._reserve_fresh(reservations, shard, first_row)
            if fresh is not None:
                return fresh
        now_ms, lease_ms = int(time.time() * 1000), int(lease_s * 1000)
        runs, number = _runs([r.run_id for r in reservations])
        keys = [self._keys.record(r.job_id) for r in reservations]
        keys.append(self._keys.shard_runs(shard))
        for run_id in runs:
            keys += [self._keys.run(run_id), self._keys.run_repeats(run_id)]
        args: list[str | bytes | int] = [shard, now_ms, lease_ms, self._ttl_s, first_row,
                                         int(takeover), len(reservations), len(runs),
                                         self._keys.shard(""),
                                         b"".join(number.get(r.run_id or "", 0).to_bytes(2, "big")
                                                  for r in reservations)]
        args += [with_row(r.record, row) for row, r in enumerate(reservations, first_row)]
        args += runs
        raw = self._reserve_script(keys=keys, args=args)
        return [_parse_claim(item, now_ms, lease_ms) for item in raw]

    def _reserve_fresh(self, reservations: Sequence[Reservation], shard: str,
                       first_row: int) -> list[Claim] | None:
        """The common case of a bulk batch, none of whose jobs has a record yet, without a
        script: a `SET NX EX` per job and the batch's counts for its runs, in one pipelined
        round trip (a script's `redis.call` costs Redis 1.5-2 times a plain command's CPU:
        docs/scaling.md). The rows and counts assume every row is won; if one
        is not, the script decides (None), renumbering and recounting this call's own rows
        and setting the same counts, so a round trip sent twice changes nothing."""
        with self._redis.pipeline(transaction=False) as pipe:
            for row, r in enumerate(reservations, first_row):
                pipe.set(self._keys.record(r.job_id), with_row(r.record, row), nx=True,
                         ex=self._ttl_s)
            counts = Counter(r.run_id for r in reservations)
            pending = self._keys.shard_runs(shard)
            pipe.hset(pending, mapping={f"{run_id}\tdone\t{first_row}:0": jobs
                                        for run_id, jobs in counts.items()})
            pipe.expire(pending, self._ttl_s)
            won = pipe.execute()[:len(reservations)]
        if not all(won):
            return None
        return [Claim("new", row=row) for row in range(first_row, first_row + len(won))]

    def still_held(self, job_ids: Sequence[str], shard: str) -> list[bool]:
        """Whether `shard` still holds each reservation, renewing those it holds: checked just
        before a slow shard is committed, so that the commit has a whole lease to land in."""
        if not job_ids:
            return []
        keys = [self._keys.record(job_id) for job_id in job_ids]
        now_ms = int(time.time() * 1000)
        return [bool(flag) for flag in self._holds_script(keys=keys, args=[shard, now_ms])]

    def commit(self, shard: str, uri: str) -> Commit:
        """The shard's manifest is written: its rows' records now read as done, and their
        counts go to their runs, the first time only. A shard revoked (another writer took
        one of its rows over, or failed it, after its lease) is never committed."""
        keys = [self._keys.shard(shard), self._keys.shard_runs(shard)]
        state = self._commit_script(keys=keys, args=[uri, self._ttl_s, self._keys.run("")])
        return (Commit.REVOKED, Commit.COMMITTED, Commit.ALREADY)[int(state)]

    def release(self, job_ids: Sequence[str], shard: str) -> None:
        """A shard that will not be committed gives its reservations up at once."""
        if job_ids:
            self._release_script(keys=[self._keys.record(job_id) for job_id in job_ids],
                                 args=[shard])

    def count_repeats(self, job_ids: Sequence[str], run_id: str | None) -> int:
        """Count in `run_id` the jobs that another run settled (each once), when they are
        found settled without being reserved; how many were counted now."""
        if not job_ids or not run_id:
            return 0
        keys = [self._keys.record(job_id) for job_id in job_ids]
        keys += [self._keys.run(run_id), self._keys.run_repeats(run_id)]
        return int(self._repeats_script(keys=keys, args=[run_tag(run_id), self._ttl_s,
                                                          self._keys.shard("")]))

    def fail(self, settlements: Sequence[Settlement]) -> list[bool]:
        """Record failed results in one round trip; True for each job failed for the first
        time (its run counted it). A job whose row is done, or being written by a writer
        whose lease runs, keeps it; a dead writer's reservation gives way."""
        if not settlements:
            return []
        runs, number = _runs([s.run_id for s in settlements])
        keys = [self._keys.record(s.result.job_id) for s in settlements]
        for run_id in runs:
            keys += [self._keys.run(run_id), self._keys.run_failures(run_id),
                     self._keys.run_repeats(run_id)]
        args: list[str | bytes | int] = [self._ttl_s, len(settlements), len(runs),
                                         self._keys.shard(""), int(time.time() * 1000),
                                         int(self._lease_s * 1000)]
        for s in settlements:
            error = s.result.error
            args += [encode_record(s.result, s.run_id),
                     number.get(s.run_id or "", 0),
                     error.code.value if error else "", _failure_line(s)]
        return [bool(flag) for flag in self._fail_script(keys=keys, args=args)]


_LOCK = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


class RunStore:
    """A run's counters and failure list, as producers and `dualstream status` read them."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, ttl_s: int) -> None:
        self._redis = client
        self._keys = keys
        self._ttl_s = ttl_s
        self._lock_script = client.register_script(_LOCK)
        self._unlock_script = client.register_script(_UNLOCK)

    def listed(self, run_id: str) -> None:
        """The producer published every job of this pass."""
        self._redis.hset(self._keys.run(run_id), "listed", 1)

    def new_pass(self, run_id: str) -> int:
        """List the run again from the start. Its counters go on: a pass adds the jobs it
        sends for the first time, and a failed job it sends again moves from failed to done
        if it succeeds (it was queued and counted already)."""
        key = self._keys.run(run_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hincrby(key, "pass", 1)
        pipe.hset(key, mapping={"listed": 0, "started_at": int(time.time())})
        pipe.hdel(key, "cursor")
        pipe.expire(key, self._ttl_s)
        passes, *_ = pipe.execute()
        return int(passes)

    def lock(self, run_id: str, owner: str, ttl_s: int) -> bool:
        """Take (or, for its owner, keep) the right to publish the run: one producer at a
        time, or both would count the same jobs."""
        return bool(self._lock_script(keys=[self._keys.run_lock(run_id)],
                                      args=[owner, ttl_s]))

    def lock_holder(self, run_id: str) -> str | None:
        holder = self._redis.get(self._keys.run_lock(run_id))
        return holder.decode() if isinstance(holder, bytes) else None

    def unlock(self, run_id: str, owner: str) -> None:
        self._unlock_script(keys=[self._keys.run_lock(run_id)], args=[owner])

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
