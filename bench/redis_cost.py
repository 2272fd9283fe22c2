"""What one job costs Redis: commands by name, Redis CPU, and bytes, producer and worker apart.

    python -m bench.redis_cost [--jobs 2048] [--per-message 32] [--labels 5] [--json PATH]
                               [--baseline GIT-REV]

A private redis-server, a tiny OpenCLIP model and a real `dualstream worker`. Bulk-shaped jobs:
zero-shot over small local JPEGs, `--labels` labels, no embedding kept in Redis, packed
`--per-message` per message under one run id, as `dualstream bulk` sends them.

1. Enqueue, with no worker: Redis's CPU time (`INFO cpu`, less its idle rate) and its
   commands by name (`INFO commandstats`) per job; the bytes a queued job holds (its share of
   its message), from the keyspace: every key's `MEMORY USAGE` and the hash tables.
2. A worker starts and runs the queue to the end: the same per job, less Redis's idle rate
   while the worker loads and what the worker costs Redis while idle after (heartbeats,
   blocking fetches: measured after, per second, and reported); then the bytes a finished job
   keeps (the queue empty again). The bench watches the queue
   and the in-flight lists only (a few commands a second, subtracted).
3. Single submissions (`--singles`, default 64), one message each, read back once each: the
   commands each costs, by name.
4. The worker's Redis work replayed in this process, without a model (`replay`): what a job
   costs a Redis that has its core to itself; and both sides' traffic recorded and replayed
   over several connections at once (`capacity`, bench/redis_capacity.py, added to the report
   by `python -m bench --redis-cost`): what a job costs a Redis kept busy, as one feeding many
   workers is.
5. This machine's floor (`floor`): Redis CPU per round trip and per record written, and the
   least a bulk job can cost with a message's fetch, reservation, commit and ack.
6. Two ways to keep records (`layouts`), in the steady state of a 7-day TTL (a keyspace that
   already holds a week of records): a key each (`SET NX EX`, what dualstream does), and a
   field each of per-day hashes (the batch's lookups in every day kept, one `HSET` into
   today's), 32 records to a script.

Script time (`evalsha`) includes the commands scripts call, which `commandstats` also counts
under their own names, so CPU comes from the process, not from summing commands.
`--baseline REV` first measures the code at git revision REV with this same file (in a
temporary worktree, first on the path): old and new side by side, in one run and one report.

The targets (issue 11, docs/scaling.md): ≤ 5 µs of Redis CPU per bulk job, producer and worker
together; ≤ 200 bytes per queued and ≤ 256 bytes per finished bulk job.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from PIL import Image

from bench.models import DEFAULT_CACHE, model_spec
from bench.procs import clean_env, start_watched, wait_until
from producer.client import Client
from schemas.jobs import Job, Task, ZeroShotOptions
from schemas.keys import RedisKeys, queue_name
from schemas.results import Status
from schemas.settings import Settings
from worker.local import start_redis_server

RUN = "run-redis-cost"
REDIS_CPUS = {0}
LABELS = ["cat", "dog", "car", "tree", "house", "boat", "bird", "flower"]


def _jpeg(seed: int) -> bytes:
    image = Image.new("RGB", (64, 48), ((seed * 37) % 256, (seed * 91) % 256, seed % 256))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _commandstats(client: redis.Redis) -> dict[str, tuple[int, float]]:
    """command → (calls, usec), for every command Redis has run since the last reset."""
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), float(v["usec"]))
            for name, v in stats.items()}


def _cpu_s(client: redis.Redis) -> float:
    """The redis-server process's CPU time so far (user + system)."""
    cpu: dict[str, Any] = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def _cpu_us(client: redis.Redis, work: Callable[[int], object], calls: int,
            units_per_call: int = 1) -> float:
    """Redis CPU µs per unit of `work(n)`, called for n in range(calls)."""
    start = _cpu_s(client)
    for n in range(calls):
        work(n)
    return (_cpu_s(client) - start) / (calls * units_per_call) * 1e6


def _idle_rate(client: redis.Redis, seconds: float = 3.0) -> float:
    """Redis CPU seconds per second with nothing to do but what is connected now."""
    start = _cpu_s(client)
    time.sleep(seconds)
    return (_cpu_s(client) - start) / seconds


class _Phase:
    """One side's cost: Redis's CPU time (less `idle_rate` × the phase's length), and its
    commands by name, less `exclude` and this bench's own `ours`."""

    def __init__(self, client: redis.Redis, idle_rate: float) -> None:
        self._client = client
        self._idle_rate = idle_rate
        client.config_resetstat()
        self._stats = _commandstats(client)
        self._cpu = _cpu_s(client)
        self._start = time.monotonic()

    def per_job(self, jobs: int, exclude: set[str],
                ours: Counter[str] | None = None) -> dict[str, Any]:
        cpu = _cpu_s(self._client) - self._cpu
        elapsed = time.monotonic() - self._start
        after = _commandstats(self._client)
        calls = {name: after[name][0] - self._stats.get(name, (0, 0.0))[0] for name in after
                 if name not in exclude}
        for name, own in (ours or Counter()).items():
            calls[name] = calls.get(name, 0) - own
        return {
            "commands_per_job": round(sum(calls.values()) / jobs, 3),
            "redis_cpu_us_per_job": round(max(0.0, cpu - self._idle_rate * elapsed) * 1e6
                                          / jobs, 3),
            "redis_cpu_us_per_job_with_idle": round(cpu * 1e6 / jobs, 3),
            "seconds": round(elapsed, 1),
            # Script time includes the commands a script calls, which count again under
            # their own names: the sum double counts, so it is reported apart.
            "evalsha_usec_per_job": round((after.get("evalsha", (0, 0.0))[1]
                                           - self._stats.get("evalsha", (0, 0.0))[1]) / jobs, 3),
            "by_command": {name: round(n / jobs, 3) for name, n in
                           sorted(calls.items(), key=lambda kv: -kv[1]) if n},
        }


def measure(jobs: int, per_message: int, labels: int, singles: int,
            workdir: Path) -> dict[str, Any]:
    images = workdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(jobs):
        path = images / f"{i:06d}.jpg"
        path.write_bytes(_jpeg(i))
        paths.append(str(path))
    model = model_spec("tiny", DEFAULT_CACHE)
    server = start_redis_server()
    _pin(server.process.pid, REDIS_CPUS)
    try:
        return _measure(server.url, model, paths, per_message, labels, singles, workdir)
    finally:
        server.stop()


def _pin(pid: int, cpus: set[int]) -> None:
    """Keep Redis and the worker on separate cores where there are several: a worker busy on
    every core would slow Redis down and inflate its CPU time per command."""
    available = os.sched_getaffinity(0)
    if len(available) > 1 and cpus & available:
        os.sched_setaffinity(pid, cpus & available)


def _worker(url: str, model: str, workdir: Path, log: str) -> Any:
    worker = start_watched(
        ["-m", "dualstream.cli", "worker", "--loglevel", "WARNING"],
        clean_env({"redis_url": url, "model": model, "local_root": str(workdir),
                   "output_uri": (workdir / "out").as_uri(),
                   "health_dir": str(workdir / "health"), "max_batch_items": 64}, 2),
        workdir / log)
    _pin(worker.process.pid, os.sched_getaffinity(0) - REDIS_CPUS)
    return worker


def _ready(workdir: Path) -> bool:
    """The worker's readiness probe file (worker/health.py), fresh."""
    probe = workdir / "health" / "ready"
    return probe.exists() and time.time() - probe.stat().st_mtime < 5


def _drained(client: redis.Redis, queue: str, polls: Counter[str]) -> bool:
    """Nothing waits on the queue and no consumer holds a message (control/inflight.py):
    three or so commands a poll, however many jobs, so the bench's own reads stay small."""
    time.sleep(1.0)
    held = client.zrange(RedisKeys().consumers, 0, -1)
    polls["llen"] += 1 + len(held)
    polls["zrange"] += 1
    return client.llen(queue) == 0 and all(client.llen(key) == 0 for key in held)


def _measure(url: str, model: str, paths: list[str], per_message: int, labels: int,
             singles: int, workdir: Path) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    producer = Client(Settings(redis_url=url, model=model))
    options = ZeroShotOptions(labels=LABELS[:labels], top_k=labels)
    jobs = [Job(task=Task.ZERO_SHOT, image=path, model=model, zero_shot=options,
                return_embedding=False) for path in paths]
    exclude = {"info", "config|resetstat", "ping", "memory|usage", "memory|stats", "scan"}

    _connect(producer)  # so that memory before and after holds the same connections
    idle = _idle_rate(client)
    memory_empty = int(client.info("memory")["used_memory"])
    keys_empty = _key_bytes(client)
    phase = _Phase(client, idle)
    ids = producer.submit_many(jobs, per_message=per_message, run_id=RUN)
    produced = phase.per_job(len(ids), exclude)
    time.sleep(1)  # connections' buffers shrink back
    memory_queued = int(client.info("memory")["used_memory"])
    keys_queued = _key_bytes(client)

    polls: Counter[str] = Counter()
    # From before the worker starts (it fetches as soon as it can, before it says it is
    # ready); Redis's idle rate is taken off until it is ready, the idle worker's after.
    phase = _Phase(client, 0.0)
    started = time.monotonic()
    worker = _worker(url, model, workdir, "worker.log")
    try:
        wait_until(lambda: _ready(workdir), worker, 300, "the worker ready")
        loading_s = time.monotonic() - started
        wait_until(lambda: _drained(client, queue_name(model), polls), worker, 900,
                   "every message handled")
        raw = phase.per_job(len(ids), exclude, polls)
        worker_idle = _idle_rate(client)  # its heartbeats and blocking fetches, with no work
        idle_s = idle * loading_s + worker_idle * (raw["seconds"] - loading_s)
        worked = {**raw, "redis_cpu_us_per_job": round(max(
            0.0, raw["redis_cpu_us_per_job_with_idle"] - idle_s * 1e6 / len(ids)), 3),
            "idle_cpu_share": round(worker_idle, 4), "loading_s": round(loading_s, 1)}
    finally:
        worker.stop()
    statuses = producer.results.statuses(ids)
    time.sleep(1)
    memory_done = int(client.info("memory")["used_memory"])
    keys_done = _key_bytes(client)
    (workdir / "health" / "ready").unlink(missing_ok=True)
    worker = _worker(url, model, workdir, "worker-singles.log")
    try:
        single = _singles(client, Client(Settings(redis_url=url, model=model)), model, singles,
                          worker, workdir, exclude)
    finally:
        worker.stop()
    keys = RedisKeys()
    record_key = getattr(keys, "record", None) or getattr(keys, "result")  # noqa: B009
    return {
        "jobs": len(ids), "per_message": per_message, "labels": labels,
        "done": sum(s is Status.DONE for s in statuses),
        "producer": produced, "worker": worked, "singles": single,
        "redis_cpu_us_per_job": round(produced["redis_cpu_us_per_job"]
                                      + worked["redis_cpu_us_per_job"], 3),
        "commands_per_job": round(produced["commands_per_job"]
                                  + worked["commands_per_job"], 3),
        "bytes_per_queued_job": round((keys_queued - keys_empty) / len(ids), 1),
        "bytes_per_finished_job": round((keys_done - keys_empty) / len(ids), 1),
        "used_memory_per_queued_job": round((memory_queued - memory_empty) / len(ids), 1),
        "used_memory_per_finished_job": round((memory_done - memory_empty) / len(ids), 1),
        "record_bytes": client.memory_usage(record_key(ids[0]), samples=0),
    }


def replay(jobs: int, per_message: int, labels: int) -> dict[str, Any] | None:
    """The worker's Redis work per message without a model to compete with Redis for the
    CPU: fetch into an in-flight list, one reservation script for its jobs, the shard's
    commit, the ack, and, for code older than the redelivered mark, the delivery check (a
    first delivery reads no delivery record now); Redis's CPU per job. None for code without
    reservations (a `--baseline` older than issue 11)."""
    import control.inflight as inflight_module
    import control.results as results_module
    from schemas.records import encode_done
    from schemas.results import LabelScore

    if not hasattr(results_module, "Reservation"):
        return None
    reads_deliveries = not hasattr(inflight_module, "REDELIVERED_KEY")
    server = start_redis_server()
    _pin(server.process.pid, REDIS_CPUS)
    try:
        client = redis.Redis.from_url(server.url)
        keys = RedisKeys()
        store = results_module.ResultStore(client, keys, 7 * 24 * 3600)
        scores = [LabelScore(label=label, score=0.2) for label in LABELS[:labels]]
        queue, held = "dualstream.replay", f"{keys.prefix}:inflight|replay|dualstream.replay"
        client.lpush(queue, *[b"x" * 3500 for _ in range(jobs // per_message)])
        idle = _idle_rate(client)
        phase = _Phase(client, idle)
        for n in range(jobs // per_message):
            raw = client.blmove(queue, held, 1, "RIGHT", "LEFT")
            if reads_deliveries:
                client.hgetall(keys.deliveries(f"message-{n}"))
            shard = f"replay{n:010d}"
            store.reserve([results_module.Reservation(
                f"{n:08x}{i:024x}", encode_done(
                    run_id=RUN, finished_at=time.time(), attempts=1, dim=512, shard=shard,
                    row=0, labels=scores, truncated=False, embedding=None), RUN)
                for i in range(per_message)], shard, 60)
            store.commit(shard, f"s3://bucket/embeddings/m/image/{shard}.npy")
            client.lrem(held, 1, raw)
        return phase.per_job(jobs, {"info", "config|resetstat"})
    finally:
        server.stop()


_WRITE_KEYS = "for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i], 'NX', 'EX', 604800) end"


def floor(per_message: int, calls: int = 3000) -> dict[str, Any]:
    """What this machine's Redis costs at the least, whatever the protocol: CPU per round
    trip (an unpipelined PING) and per record written (a `SET NX EX` of a 100-byte record,
    32 a script), best of 3 each; and what they make of a bulk job that is fetched and acked
    with its message and reserved and committed with its batch (4 round trips a message, one
    record per job, the producer's push shared by 16 messages)."""
    server = start_redis_server()
    _pin(server.process.pid, REDIS_CPUS)
    try:
        client = redis.Redis.from_url(server.url)
        client.ping()
        ping, write = [], []
        script = client.register_script(_WRITE_KEYS)
        script(keys=["warm"], args=[b"x"])
        for attempt in range(3):
            ping.append(_cpu_us(client, lambda _: client.ping(), calls))
            write.append(_cpu_us(client, lambda n, attempt=attempt: script(
                keys=[f"floor:{attempt}:{n}:{i}" for i in range(32)],
                args=[os.urandom(100) for _ in range(32)]), calls, 32))
    finally:
        server.stop()
    round_trip, record = min(ping), min(write)
    return {"round_trip_us": round(round_trip, 2), "record_write_us": round(record, 2),
            "bulk_job_floor_us": round((4 + 1 / 16) * round_trip / per_message + record, 2),
            "runs": {"round_trip_us": [round(x, 2) for x in ping],
                     "record_write_us": [round(x, 2) for x in write]}}


# One batch of records as fields of per-day hashes: KEYS the days kept (today first); ARGV
# the fields, then the records. A field found on any day is left as it is.
_WRITE_FIELDS = """
local n = #ARGV / 2
local fields, found = {unpack(ARGV, 1, n)}, {}
for day = 1, #KEYS do
  local old = redis.call('HMGET', KEYS[day], unpack(fields))
  for i = 1, n do if old[i] then found[i] = true end end
end
local new = {}
for i = 1, n do
  if not found[i] then
    new[#new + 1] = ARGV[i]
    new[#new + 1] = ARGV[n + i]
  end
end
if #new > 0 then redis.call('HSET', KEYS[1], unpack(new)) end
redis.call('EXPIRE', KEYS[1], 691200)
"""


def layouts(per_message: int, per_day: int = 100_000, days: int = 9,
            calls: int = 2000) -> dict[str, Any]:
    """Redis CPU per record written, keys against fields of per-day hashes, with `days` days'
    records already there (`per_day` each: a 7-day TTL probes 9 days, the clock's next day
    and a day's slack included), best of 3 each: what an emptier Redis would hide (a big
    hash's lookups and inserts miss the CPU caches as a big keyspace's do)."""
    server = start_redis_server()
    _pin(server.process.pid, REDIS_CPUS)
    try:
        client = redis.Redis.from_url(server.url)
        for day in range(days):
            for _ in range(0, per_day, 5000):
                client.execute_command("HSET", f"day:{day}", *[
                    part for _ in range(5000) for part in (os.urandom(16), os.urandom(100))])
                with client.pipeline(transaction=False) as pipe:
                    for _ in range(5000):
                        pipe.set(os.urandom(16), os.urandom(100), ex=604800)
                    pipe.execute()
        keys, fields = client.register_script(_WRITE_KEYS), client.register_script(_WRITE_FIELDS)
        per_key, per_field = [], []
        for _ in range(3):
            per_key.append(_cpu_us(client, lambda _: keys(
                keys=[os.urandom(16) for _ in range(per_message)],
                args=[os.urandom(100) for _ in range(per_message)]), calls, per_message))
            per_field.append(_cpu_us(client, lambda _: fields(
                keys=[f"day:{day}" for day in range(days)],
                args=[os.urandom(16) for _ in range(per_message)]
                + [os.urandom(100) for _ in range(per_message)]), calls, per_message))
    finally:
        server.stop()
    return {"records_already_kept": per_day * days, "days_probed": days,
            "key_per_record_us": round(min(per_key), 2),
            "field_of_day_hash_us": round(min(per_field), 2),
            "runs": {"key_per_record_us": [round(x, 2) for x in per_key],
                     "field_of_day_hash_us": [round(x, 2) for x in per_field]}}


def _key_bytes(client: redis.Redis) -> int:
    """What the keyspace holds: every key's MEMORY USAGE (exact: SAMPLES 0), and the main and
    expires hash tables. `used_memory` also moves with fixed costs (scripts, buffers, the
    allocator), which a few thousand jobs do not amortise; both are reported."""
    total = sum(int(client.memory_usage(key, samples=0) or 0)
                for key in client.scan_iter(count=1000))
    stats = client.memory_stats()
    tables = stats.get("db.0") or {}
    return total + int(tables.get("overhead.hashtable.main", 0)) + int(
        tables.get("overhead.hashtable.expires", 0))


def _connect(producer: Client) -> None:
    producer.redis.ping()
    with producer.app.producer_or_acquire() as publisher:
        publisher.connection.ensure_connection()


def _singles(client: redis.Redis, producer: Client, model: str, count: int, worker: Any,
             workdir: Path, exclude: set[str]) -> dict[str, Any]:
    """Single text submissions, one message each, with their embedding kept; each read once
    when all are done. Commands only: they are too few for CPU figures."""
    jobs = [Job(task=Task.TEXT_EMBEDDING, text=f"a single text, number {i}", model=model)
            for i in range(count)]
    wait_until(lambda: _ready(workdir), worker, 300, "the worker ready")
    phase = _Phase(client, 0.0)
    ids = [producer.submit(job) for job in jobs]
    polls: Counter[str] = Counter()
    wait_until(lambda: _drained(client, queue_name(model), polls), worker, 300,
               "every single job handled")
    results = [producer.results.get(job_id) for job_id in ids]
    cost = phase.per_job(count, exclude, polls)
    keys = RedisKeys()
    record_key = getattr(keys, "record", None) or getattr(keys, "result")  # noqa: B009
    return {**cost, "jobs": count, "done": sum(r is not None and r.status is Status.DONE
                                               for r in results),
            "record_bytes_with_embedding": client.memory_usage(record_key(ids[0]), samples=0),
            "embedding_dim": results[0].embedding_dim if results[0] else None}


def _side(report: dict[str, Any]) -> list[str]:
    lines = [f"  commands per job: producer {report['producer']['commands_per_job']}, worker "
             f"{report['worker']['commands_per_job']}, together {report['commands_per_job']}",
             f"  Redis CPU µs per job: producer {report['producer']['redis_cpu_us_per_job']}, "
             f"worker {report['worker']['redis_cpu_us_per_job']}, together "
             f"{report['redis_cpu_us_per_job']} (target ≤ 5)",
             f"  bytes per job: queued {report['bytes_per_queued_job']} (target ≤ 200), "
             f"finished {report['bytes_per_finished_job']} (target ≤ 256); used_memory moved "
             f"{report.get('used_memory_per_queued_job', '-')} and "
             f"{report.get('used_memory_per_finished_job', '-')}"]
    for side in ("producer", "worker"):
        top = ", ".join(f"{name} {n}" for name, n in
                        list(report[side]["by_command"].items())[:12])
        lines.append(f"  {side} by command (per job): {top}")
    replayed = report.get("replay")
    if replayed:
        lines.append(f"  the worker's Redis work replayed without a model: "
                     f"{replayed['redis_cpu_us_per_job']} µs per job, best of "
                     f"{replayed['runs_us_per_job']} ({replayed['commands_per_job']} commands)")
    busy = report.get("capacity")
    if busy:
        lines.append(f"  at capacity ({busy['lanes']} connections a side, "
                     f"{busy['records_already_kept']:,} records kept): producer "
                     f"{busy['producer']['redis_cpu_us_per_job']} µs + worker "
                     f"{busy['worker']['redis_cpu_us_per_job']} µs = "
                     f"{busy['redis_cpu_us_per_job']} µs per bulk job (target ≤ 5), Redis busy "
                     f"{busy['producer']['redis_busy']} / {busy['worker']['redis_busy']}; "
                     f"runs {busy['runs_us_per_job']}")
    least = report.get("floor")
    if least:
        lines.append(f"  this machine's floor: a round trip {least['round_trip_us']} µs of Redis "
                     f"CPU, a record written {least['record_write_us']} µs; a bulk job fetched, "
                     f"reserved, committed and acked with {report['per_message']} others "
                     f"costs at least {least['bulk_job_floor_us']} µs")
    kept = report.get("layouts")
    if kept:
        lines.append(f"  a record written with {kept['records_already_kept']:,} kept: as a key "
                     f"{kept['key_per_record_us']} µs, as a field of per-day hashes (probing "
                     f"{kept['days_probed']} days) {kept['field_of_day_hash_us']} µs; runs "
                     f"{kept['runs']}")
    single = report.get("singles")
    if single:
        top = ", ".join(f"{name} {n}" for name, n in list(single["by_command"].items())[:12])
        lines.append(f"  a single submission ({single['jobs']}, embedding kept, read once): "
                     f"{single['commands_per_job']} commands, {single['redis_cpu_us_per_job']} "
                     f"µs; record {single['record_bytes_with_embedding']} bytes "
                     f"(MEMORY USAGE, dim {single['embedding_dim']}); {top}")
    return lines


def render(report: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    lines = [f"Redis cost per bulk job ({report['jobs']} jobs, {report['per_message']} per "
             f"message, {report['labels']} labels)"]
    if baseline is not None:
        lines += [f"baseline ({baseline.get('revision', '?')}):", *_side(baseline), "this tree:"]
    lines += _side(report)
    return "\n".join(lines)


def _baseline(revision: str, args: argparse.Namespace) -> dict[str, Any]:
    """The same measurement, by this file, of the code at `revision` (in a temporary git
    worktree, first on the path): old and new measured the same way, in one run."""
    # Here, not at the top: this file also runs with an older tree's `bench` on the path.
    from bench.worktree import checkout

    with checkout(revision) as tree:
        out = tree / "redis-cost-report.json"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--jobs",
                        str(args.jobs), "--per-message", str(args.per_message),
                        "--labels", str(args.labels), "--singles", str(args.singles),
                        "--json", str(out)], cwd=tree, env=env, check=True)
        report: dict[str, Any] = json.loads(out.read_text())
    report["revision"] = revision
    return report


def section(jobs: int, per_message: int, labels: int, singles: int,
            baseline_revision: str | None = None) -> dict[str, Any]:
    """The whole measurement as one report: what `python -m bench --redis-cost` adds to its
    JSON, and what this module's command prints."""
    args = argparse.Namespace(jobs=jobs, per_message=per_message, labels=labels,
                              singles=singles)
    baseline = _baseline(baseline_revision, args) if baseline_revision else None
    with tempfile.TemporaryDirectory(prefix="ds-redis-cost-") as workdir:
        report = measure(jobs, per_message, labels, singles, Path(workdir))
    replays = [replay(max(jobs, 16_384), per_message, labels) for _ in range(3)]
    if all(replays):
        # This VM's per-command cost moves by half from one run to the next: best and worst.
        best = min(replays, key=lambda r: r["redis_cpu_us_per_job"])  # type: ignore[index]
        report["replay"] = {**best, "runs_us_per_job": [r["redis_cpu_us_per_job"]  # type: ignore[index]
                                                        for r in replays]}
    report["floor"] = floor(per_message)
    report["layouts"] = layouts(per_message)
    report["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if baseline is not None:
        report["baseline"] = baseline
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2048)
    parser.add_argument("--per-message", type=int, default=32)
    parser.add_argument("--labels", type=int, default=5)
    parser.add_argument("--singles", type=int, default=64)
    parser.add_argument("--baseline", default=None, metavar="GIT-REV")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = section(args.jobs, args.per_message, args.labels, args.singles, args.baseline)
    print(render(report, report.get("baseline")))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
