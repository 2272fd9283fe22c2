"""What one job costs Redis: commands by name, Redis CPU, and bytes, producer and worker apart.

    python -m bench.redis_cost [--jobs 2048] [--per-message 32] [--labels 5] [--json PATH]
                               [--baseline GIT-REV]

A private redis-server, a tiny OpenCLIP model and a real `dualstream worker`. Bulk-shaped jobs:
zero-shot over small local JPEGs, `--labels` labels, no embedding kept in Redis, packed
`--per-message` per message under one run id, as `dualstream bulk` sends them.

1. Enqueue, with no worker: `INFO commandstats` before and after gives the producer's commands
   and Redis CPU (`usec`) per job; `used_memory` before and after gives the bytes a queued job
   holds (its share of its message included).
2. A worker runs the queue to the end: the same counters give the worker's commands and Redis
   CPU per job; `used_memory` then gives what a finished job keeps (its record; the queue is
   empty again). The worker's background traffic (heartbeats, sweeps) while it works is
   included, as it is part of the cost. The bench waits on the run's counters (one HGETALL a
   second; subtracted).
3. Single submissions (`--singles`, default 64), one message each, each read back once: the
   commands each costs, by name.

`--baseline REV` first measures the code at git revision REV the same way (its own
`bench/redis_cost.py`, in a temporary worktree), so that old and new are side by side in one
run and one report.

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
from pathlib import Path
from typing import Any

import redis
from PIL import Image

from bench.models import DEFAULT_CACHE, model_spec
from bench.procs import clean_env, start_watched, wait_until
from producer.client import Client
from schemas.jobs import Job, Task, ZeroShotOptions
from schemas.keys import RedisKeys
from schemas.results import Status
from schemas.settings import Settings
from worker.local import start_redis_server

RUN = "run-redis-cost"
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


def _per_job(before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]],
             jobs: int, exclude: set[str], ours: Counter[str] | None = None) -> dict[str, Any]:
    """Per job, less the commands named in `exclude` and the `ours` calls this bench made
    itself (their CPU taken at the command's average)."""
    ours = ours or Counter()
    calls = {name: after[name][0] - before.get(name, (0, 0.0))[0] for name in after
             if name not in exclude}
    usec = {name: after[name][1] - before.get(name, (0, 0.0))[1] for name in after
            if name not in exclude}
    for name, own in ours.items():
        if calls.get(name):
            usec[name] -= usec[name] * min(1.0, own / calls[name])
            calls[name] -= own
    return {
        "commands_per_job": round(sum(calls.values()) / jobs, 3),
        "redis_cpu_us_per_job": round(sum(usec.values()) / jobs, 3),
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
    try:
        return _measure(server.url, model, paths, per_message, labels, singles, workdir)
    finally:
        server.stop()


def _measure(url: str, model: str, paths: list[str], per_message: int, labels: int,
             singles: int, workdir: Path) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    producer = Client(Settings(redis_url=url, model=model))
    options = ZeroShotOptions(labels=LABELS[:labels], top_k=labels)
    jobs = [Job(task=Task.ZERO_SHOT, image=path, model=model, zero_shot=options,
                return_embedding=False) for path in paths]
    exclude = {"info", "config|resetstat", "ping"}

    _connect(producer)  # so that memory before and after holds the same connections
    client.config_resetstat()
    memory_empty = int(client.info("memory")["used_memory"])
    keys_empty = _key_bytes(client)
    before = _commandstats(client)
    ids = producer.submit_many(jobs, per_message=per_message, run_id=RUN)
    produced = _per_job(before, _commandstats(client), len(ids), exclude)
    time.sleep(1)  # connections' buffers shrink back
    memory_queued = int(client.info("memory")["used_memory"])
    keys_queued = _key_bytes(client)

    client.config_resetstat()
    before = _commandstats(client)
    worker = start_watched(
        ["-m", "dualstream.cli", "worker", "--loglevel", "WARNING"],
        clean_env({"redis_url": url, "model": model, "local_root": str(workdir),
                   "output_uri": (workdir / "out").as_uri(),
                   "health_dir": str(workdir / "health"), "max_batch_items": 64}, 2),
        workdir / "worker.log")
    polls: Counter[str] = Counter()
    watcher = Client(Settings(redis_url=url, model=model))

    def run_settled() -> bool:
        time.sleep(1.0)  # the bench's own polling: one HGETALL a second, subtracted
        polls["hgetall"] += 1
        return watcher.run_progress(RUN).settled >= len(ids)

    try:
        wait_until(run_settled, worker, 600, "every job done")
        worked = _per_job(before, _commandstats(client), len(ids), exclude, polls)
    finally:
        worker.stop()
    watcher.redis.connection_pool.disconnect()
    time.sleep(1)
    memory_done = int(client.info("memory")["used_memory"])
    keys_done = _key_bytes(client)
    worker = start_watched(
        ["-m", "dualstream.cli", "worker", "--loglevel", "WARNING"],
        clean_env({"redis_url": url, "model": model, "local_root": str(workdir),
                   "output_uri": (workdir / "out").as_uri(),
                   "health_dir": str(workdir / "health"), "max_batch_items": 64}, 2),
        workdir / "worker-singles.log")
    try:
        fresh = Client(Settings(redis_url=url, model=model))
        single = _singles(client, fresh, model, singles, worker, exclude)
    finally:
        worker.stop()
    keys = RedisKeys()
    return {
        "jobs": len(ids), "per_message": per_message, "labels": labels,
        "producer": produced, "worker": worked, "singles": single,
        "redis_cpu_us_per_job": round(produced["redis_cpu_us_per_job"]
                                      + worked["redis_cpu_us_per_job"], 3),
        "commands_per_job": round(produced["commands_per_job"]
                                  + worked["commands_per_job"], 3),
        "bytes_per_queued_job": round((keys_queued - keys_empty) / len(ids), 1),
        "bytes_per_finished_job": round((keys_done - keys_empty) / len(ids), 1),
        "used_memory_per_queued_job": round((memory_queued - memory_empty) / len(ids), 1),
        "used_memory_per_finished_job": round((memory_done - memory_empty) / len(ids), 1),
        "record_bytes": client.memory_usage(keys.record(ids[0])),
        "run": watcher.run_progress(RUN).model_dump(),
    }


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
             exclude: set[str]) -> dict[str, Any]:
    """Single text submissions, one message each, with their embedding kept; each read once
    when all are done."""
    jobs = [Job(task=Task.TEXT_EMBEDDING, text=f"a single text, number {i}", model=model)
            for i in range(count)]
    client.config_resetstat()
    before = _commandstats(client)
    ids = [producer.submit(job) for job in jobs]
    polls: Counter[str] = Counter()

    def all_done() -> bool:
        time.sleep(0.5)
        polls["mget"] += 1
        return all(s is Status.DONE for s in producer.results.statuses(ids))

    wait_until(all_done, worker, 300, "every single job done")
    results = [producer.results.get(job_id) for job_id in ids]
    cost = _per_job(before, _commandstats(client), count, exclude, polls)
    return {**cost, "jobs": count,
            "record_bytes_with_embedding": client.memory_usage(RedisKeys().record(ids[0])),
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
    """The same measurement by the code at `revision`, in a temporary git worktree."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="ds-redis-cost-base-") as tmp:
        tree, out = Path(tmp) / "tree", Path(tmp) / "report.json"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree),
                        revision], check=True, capture_output=True)
        try:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            subprocess.run([sys.executable, "-m", "bench.redis_cost", "--jobs", str(args.jobs),
                            "--per-message", str(args.per_message), "--labels",
                            str(args.labels), "--json", str(out)], cwd=tree, env=env,
                           check=True)
            report: dict[str, Any] = json.loads(out.read_text())
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force",
                            str(tree)], check=False, capture_output=True)
    report["revision"] = revision
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
    baseline = _baseline(args.baseline, args) if args.baseline else None
    with tempfile.TemporaryDirectory(prefix="ds-redis-cost-") as workdir:
        report = measure(args.jobs, args.per_message, args.labels, args.singles,
                         Path(workdir))
    report["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if baseline is not None:
        report["baseline"] = baseline
    print(render(report, baseline))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
