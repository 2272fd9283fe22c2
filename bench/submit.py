"""How fast a producer enqueues: `Client.submit_many` of text jobs into a private redis-server.

    python -m bench.submit [--jobs 50000] [--per-message 32] [--repeats 3]

Jobs are built first (not timed); the best of `--repeats` runs, each into an empty Redis under
a new run id, is reported. The script uses only `Client.submit_many`, so an older checkout can
be measured the same way: `PYTHONPATH=<old checkout> python bench/submit.py`.
"""

from __future__ import annotations

import argparse
import json
import time

import redis

from producer.client import Client
from schemas.jobs import Job, Task
from schemas.settings import Settings
from worker.local import start_redis_server


def measure(jobs: int, per_message: int, repeats: int) -> dict[str, float]:
    server = start_redis_server()
    redis_client = redis.Redis.from_url(server.url)
    try:
        best = float("inf")
        for repeat in range(repeats):
            redis_client.flushall()
            client = Client(Settings(redis_url=server.url, model="bench/model"))
            batch = [Job(task=Task.TEXT_EMBEDDING, text=f"text {repeat} number {i}",
                         model="bench/model", return_embedding=False) for i in range(jobs)]
            start = time.perf_counter()
            client.submit_many(batch, per_message=per_message, run_id=f"run-bench-{repeat}")
            best = min(best, time.perf_counter() - start)
        queued = sum(redis_client.llen(key) for key in redis_client.keys("dualstream.*")
                     if redis_client.type(key) == b"list")
    finally:
        server.stop()
    return {"jobs": jobs, "per_message": per_message, "jobs_per_s": round(jobs / best),
            "messages_on_queue": queued}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--per-message", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(args.jobs, args.per_message, args.repeats)))


if __name__ == "__main__":
    main()
