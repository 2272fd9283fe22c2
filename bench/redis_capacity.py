"""What a bulk job costs a Redis that is kept busy: the producer's and the worker's Redis
traffic, recorded from the real code, replayed at full speed over several connections.

On an idle Redis every request first wakes it up, and on a small VM a wake-up costs more CPU
than the request (about 30 µs a round trip here, `floor` in bench/redis_cost.py): one worker
talking to an idle Redis measures mostly that. A Redis feeding many GPU workers is never idle
between requests, so its cost per job is what this measures, and it is the figure that says how
many jobs one Redis core carries.

1. Record: the producer (`Client.submit_many`, bulk-shaped jobs under one run) and the
   worker's per-message work (fetch into an in-flight list, the batch's reservation script,
   the shard's commit, the ack; `control/`), run for real against a scratch Redis, every
   request captured as the bytes redis-py sends (`Connection.send_packed_command`).
2. Reset: the keyspace emptied (scripts stay loaded), a week of records put back
   (`--kept`: the steady state of a 7-day TTL, which a big keyspace's cache misses make
   dearer), and the queue refilled.
3. Replay: the producer's requests, then the worker's, each side split over `lanes`
   connections that a single-threaded client keeps busy (a lane sends its next request when
   its last reply is in, as the real code does), the bytes exactly as recorded. Redis's CPU
   (`INFO cpu`) per job, and how busy it was (CPU seconds per second: near 1.0 means
   saturated). Every reply is checked: an error reply fails the bench.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hiredis
import redis
import redis.connection

from bench.redis_cost import LABELS, REDIS_CPUS, RUN, _commandstats, _cpu_s, _pin
from control.results import Reservation, ResultStore
from producer.client import Client
from schemas.jobs import Job, Task, ZeroShotOptions
from schemas.keys import RedisKeys
from schemas.records import encode_done
from schemas.results import LabelScore
from schemas.settings import Settings
from worker.local import start_redis_server

# Sent by redis-py when it connects, not part of the protocol being measured.
_HANDSHAKE = {b"HELLO", b"CLIENT", b"SELECT", b"AUTH"}
MESSAGE_BYTES = 3500  # a 32-job message as the producer packs it (bench/redis_cost.py)
JOBS = 32_768  # a run's jobs by default: enough for the replays to last seconds


@dataclass
class _Request:
    payload: bytes
    replies: int


@dataclass
class _Lane:
    requests: list[_Request]
    sock: socket.socket | None = None
    next: int = 0
    waiting: int = 0
    reader: Any = field(default_factory=hiredis.Reader)


def _commands(payload: bytes) -> list[list[bytes]]:
    """The commands a packed request holds (RESP arrays, as a server reads them)."""
    reader = hiredis.Reader()
    reader.feed(payload)
    found = []
    while (command := reader.gets()) is not False:
        found.append(command)
    return found


@contextlib.contextmanager
def recording() -> Iterator[dict[int, list[_Request]]]:
    """Every request redis-py sends meanwhile, by connection (its handshake left out)."""
    captured: dict[int, list[_Request]] = {}
    original = redis.connection.AbstractConnection.send_packed_command

    def send(self: Any, command: Any, check_health: bool = True) -> None:
        payload = command if isinstance(command, bytes) else b"".join(command)
        commands = [c for c in _commands(payload) if c[0].upper() not in _HANDSHAKE]
        if commands:
            captured.setdefault(id(self), []).append(_Request(payload, len(commands)))
        original(self, command, check_health)

    redis.connection.AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
    try:
        yield captured
    finally:
        redis.connection.AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


def _worker_requests(client: redis.Redis, messages: int, per_message: int,
                     labels: int) -> None:
    """The worker's Redis work for `messages` messages, as the worker does it, without a
    model (bench/redis_cost.py `replay`): one connection, one message after another."""
    keys = RedisKeys()
    store = ResultStore(client, keys, 7 * 24 * 3600)
    scores = [LabelScore(label=label, score=0.2) for label in LABELS[:labels]]
    queue, held = "dualstream.capacity", f"{keys.prefix}:inflight|capacity|dualstream.capacity"
    salt = os.urandom(4).hex()
    for n in range(messages):
        raw = client.blmove(queue, held, 1, "RIGHT", "LEFT")
        shard = f"cap{salt}{n:08d}"
        store.reserve([Reservation(f"{salt}{n:08x}{i:020x}", encode_done(
            run_id=RUN, finished_at=time.time(), attempts=1, dim=512, shard=shard, row=0,
            labels=scores, truncated=False, embedding=None), RUN)
            for i in range(per_message)], shard, 60)
        store.commit(shard, f"s3://bucket/embeddings/m/image/{shard}.npy")
        client.lrem(held, 1, raw)


def _fill(client: redis.Redis, kept: int, messages: int) -> None:
    """A week of records (random 16-byte keys, 150-byte values, a week's TTL) and the queue."""
    client.flushall()
    for start in range(0, kept, 5000):
        with client.pipeline(transaction=False) as pipe:
            for _ in range(min(5000, kept - start)):
                pipe.set(os.urandom(16), os.urandom(150), ex=604800)
            pipe.execute()
    for start in range(0, messages, 1000):
        client.lpush("dualstream.capacity",
                     *[b"x" * MESSAGE_BYTES for _ in range(min(1000, messages - start))])


def _replay(host: str, port: int, lanes: list[list[_Request]]) -> int:
    """Send every lane's requests in order, all lanes at once; the replies counted, errors
    returned as their number."""
    selector = selectors.DefaultSelector()
    active = [_Lane(requests) for requests in lanes if requests]
    errors = 0
    for lane in active:
        lane.sock = socket.create_connection((host, port))
        lane.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        selector.register(lane.sock, selectors.EVENT_READ, lane)
        _send_next(lane)
    remaining = len(active)
    while remaining:
        for key, _ in selector.select():
            lane = key.data
            lane.reader.feed(lane.sock.recv(1 << 20))
            while lane.waiting and (reply := lane.reader.gets()) is not False:
                lane.waiting -= 1
                errors += isinstance(reply, hiredis.ReplyError)
            if lane.waiting == 0:
                if lane.next == len(lane.requests):
                    selector.unregister(lane.sock)
                    lane.sock.close()
                    remaining -= 1
                else:
                    _send_next(lane)
    return errors


def _send_next(lane: _Lane) -> None:
    request = lane.requests[lane.next]
    lane.next += 1
    lane.waiting = request.replies
    assert lane.sock is not None
    lane.sock.sendall(request.payload)


def _split(requests: list[_Request], lanes: int) -> list[list[_Request]]:
    return [requests[i::lanes] for i in range(lanes)]


def _phase(client: redis.Redis, url: str, lanes: list[list[_Request]],
           jobs: int) -> dict[str, Any]:
    address = client.connection_pool.connection_kwargs
    client.config_resetstat()
    start, started = _cpu_s(client), time.monotonic()
    errors = _replay(address["host"], address["port"], lanes)
    cpu, elapsed = _cpu_s(client) - start, time.monotonic() - started
    if errors:
        raise RuntimeError(f"{errors} error replies replaying against {url}")
    stats = _commandstats(client)
    return {"redis_cpu_us_per_job": round(cpu * 1e6 / jobs, 3),
            "evalsha_usec_per_job": round(stats.get("evalsha", (0, 0.0))[1] / jobs, 3),
            "commands_per_job": round(sum(calls for calls, _ in stats.values()) / jobs, 3),
            "usec_per_job_by_command": {name: round(usec / jobs, 3)
                                        for name, (_, usec) in stats.items()},
            "redis_busy": round(cpu / elapsed, 2), "jobs_per_s": round(jobs / elapsed),
            "requests": sum(len(lane) for lane in lanes)}


def measure(jobs: int = JOBS, per_message: int = 32, labels: int = 5, lanes: int = 8,
            kept: int = 900_000) -> dict[str, Any]:
    """Record both sides' traffic for `jobs` bulk jobs, replay it on a Redis holding `kept`
    records over `lanes` connections a side; Redis CPU per job, best of 3 replays."""
    messages = jobs // per_message
    server = start_redis_server()
    _pin(server.process.pid, REDIS_CPUS)
    try:
        client = redis.Redis.from_url(server.url)
        model = "openclip:ViT-B-16/laion2b_s34b_b88k"
        options = ZeroShotOptions(labels=LABELS[:labels], top_k=labels)
        bulk = [Job(task=Task.ZERO_SHOT, image=f"s3://bucket/photos/{i:08d}.jpg", model=model,
                    zero_shot=options, return_embedding=False) for i in range(jobs)]
        _fill(client, 0, messages + 1)
        producer = Client(Settings(redis_url=server.url, model=model))
        worker_client = redis.Redis.from_url(server.url)
        # Once before recording, so that every script is loaded: a recorded EVALSHA that
        # failed with NOSCRIPT would run its script when replayed.
        producer.submit_many(bulk[:per_message], per_message=per_message, run_id="warm-up")
        _worker_requests(worker_client, 1, per_message, labels)
        with recording() as captured:
            producer.submit_many(bulk, per_message=per_message, run_id=RUN)
            produced = [r for requests in captured.values() for r in requests]
            captured.clear()
            _worker_requests(worker_client, messages, per_message, labels)
            worked = [r for requests in captured.values() for r in requests]
        runs = []
        for _ in range(3):
            _fill(client, kept, 0)
            producer_side = _phase(client, server.url, _split(produced, lanes), jobs)
            _fill(client, kept, messages)
            worker_side = _phase(client, server.url, _split(worked, lanes), jobs)
            if client.dbsize() - kept < jobs:  # each job's record, each shard's key
                raise RuntimeError(f"the replay wrote {client.dbsize() - kept} keys for "
                                   f"{jobs} jobs: it did not redo the recorded work")
            runs.append({"producer": producer_side, "worker": worker_side,
                         "redis_cpu_us_per_job": round(producer_side["redis_cpu_us_per_job"]
                                                       + worker_side["redis_cpu_us_per_job"], 3)})
    finally:
        server.stop()
    best = min(runs, key=lambda run: run["redis_cpu_us_per_job"])
    return {**best, "jobs": jobs, "per_message": per_message, "labels": labels,
            "lanes": lanes, "records_already_kept": kept,
            "runs_us_per_job": [run["redis_cpu_us_per_job"] for run in runs]}


def baseline(revision: str, jobs: int = JOBS) -> dict[str, Any]:
    """The same measurement, by this file, of the code at `revision` (its `control/` and
    producer first on the path): old and new side by side, in one run."""
    # Here, not at the top: this file also runs with an older tree's `bench` on the path.
    from bench.worktree import checkout

    with checkout(revision) as tree:
        out = tree / "capacity-report.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--jobs", str(jobs),
                        "--json", str(out)], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                       check=True)
        report: dict[str, Any] = json.loads(out.read_text())
    report["revision"] = revision
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=JOBS)
    parser.add_argument("--lanes", type=int, default=8)
    parser.add_argument("--kept", type=int, default=900_000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = measure(args.jobs, lanes=args.lanes, kept=args.kept)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
