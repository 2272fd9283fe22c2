"""Modes b and c, end to end: producer (this process) → Redis → a worker process → outputs.

The jobs are zero-shot jobs on the benchmark's JPEGs, or, in text mode, text-embedding jobs
on its generated captions.

Each mode gets its own private `redis-server` on a free port and its own worker process.
After a warm-up (the model loads, label embeddings are cached, the first batches run), it
measures:
- throughput: every job submitted at once (b: several jobs a message, through the real
  `Client.submit_many`; c: one job a message), from the first submit to the last job done, as
  stamped by the worker (`timings.finished_at`);
- latency at light load: single jobs, one at a time, each awaited before the next is sent;
  from just before the submit to the worker's `finished_at` stamp;
- batch fill: rows per committed shard of the throughput runs (from the manifests);
- the worker's peak RSS (VmHWM, summed over its process tree) and CPU seconds.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from pydantic import SecretStr

from bench.procs import CpuWindow, Watched, clean_env, start_watched, wait_until
from bench.stacks import Profiler
from control.connections import redis_client
from control.results import ResultStore
from schemas.jobs import Job, Task, ZeroShotOptions
from schemas.keys import RedisKeys, ShardPaths
from schemas.results import JobResult, Status
from schemas.settings import Settings
from worker.local import start_redis_server

READY_TIMEOUT_S = 600


@dataclass(frozen=True)
class E2EPlan:
    mode: str  # "dualstream" or "naive" ("ceiling" for the plan the others derive from)
    spec: str
    image_dir: Path  # the workers' local root
    sources: list[str]  # image paths under `image_dir`, or in text mode the texts themselves
    labels: list[str]
    workdir: Path
    torch_threads: int
    latency_jobs: int
    warmup_jobs: int = 8
    per_message: int = 32
    worker_settings: dict[str, object] = field(default_factory=dict)
    repeats: int = 1
    profile: str | None = None  # "gil" or "cpu": py-spy the worker during the last repeat
    naive_pool: str = "threads"
    naive_concurrency: int = 4
    device: str = "cpu"
    dtype: str = "fp32"
    settings: dict[str, str] = field(default_factory=dict)  # for both modes (and the ceiling)
    modality: str = "image"  # or "text"


def make_jobs(plan: E2EPlan, phase: str, count: int | None = None) -> list[Job]:
    """Zero-shot jobs (text-embedding jobs in text mode), as a bulk run sends them; `phase`
    keeps job ids apart between phases."""
    sources = plan.sources if count is None else [
        plan.sources[i % len(plan.sources)] for i in range(count)]
    if plan.modality == "text":
        return [Job(task=Task.TEXT_EMBEDDING, text=text, model=plan.spec,
                    return_embedding=False, idempotency_key=f"{phase}-{i}")
                for i, text in enumerate(sources)]
    options = ZeroShotOptions(labels=plan.labels, top_k=3)
    return [Job(task=Task.ZERO_SHOT, image=source, model=plan.spec, zero_shot=options,
                return_embedding=False, idempotency_key=f"{phase}-{i}")
            for i, source in enumerate(sources)]


class Submitter:
    """How a mode gets jobs onto the queue."""

    def __init__(self, plan: E2EPlan, settings: Settings) -> None:
        self.plan = plan
        if plan.mode == "dualstream":
            from producer.client import Client

            self.client = Client(settings)
        else:
            from bench.naive import QUEUE, TASK_NAME, create_naive_app

            self.app = create_naive_app(settings)
            self.queue, self.task_name = QUEUE, TASK_NAME

    def bulk(self, jobs: Sequence[Job]) -> None:
        if self.plan.mode == "dualstream":
            self.client.submit_many(jobs, per_message=self.plan.per_message)
            return
        with self.app.producer_or_acquire() as producer:
            for job in jobs:
                self.app.send_task(self.task_name, args=[job.model_dump(mode="json")],
                                   queue=self.queue, producer=producer)

    def one(self, job: Job) -> None:
        if self.plan.mode == "dualstream":
            self.client.submit(job)
        else:
            self.bulk([job])


def _worker_args(plan: E2EPlan) -> list[str]:
    if plan.mode == "dualstream":
        return ["-m", "dualstream.cli", "worker", "--loglevel", "WARNING"]
    return ["-m", "bench.naive", "--pool", plan.naive_pool, "--concurrency",
            str(plan.naive_concurrency), "--loglevel", "WARNING"]


def _wait_all(results: ResultStore, ids: Sequence[str], watched: Watched, timeout: float,
              poll_s: float, window: int = 64) -> list[JobResult]:
    """Wait until every job has finished. Jobs finish roughly in submission order, so each
    poll reads the status of at most `window` of the oldest unfinished ones: polling stays
    cheap (the benchmark shares the CPU with the worker) and every job is still checked."""
    pending = list(dict.fromkeys(ids))

    def finished() -> bool:
        nonlocal pending
        head = pending[:window]
        statuses = results.statuses(head)
        still = [job_id for job_id, status in zip(head, statuses, strict=True)
                 if status not in (Status.DONE, Status.FAILED)]
        pending = still + pending[window:]
        return not pending

    wait_until(finished, watched, timeout, "waiting for results", poll_s)
    found = results.get_many(list(ids))
    return [r for r in found if r is not None]


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"n": len(values), "p50": statistics.median(ordered), "p95": p95,
            "min": ordered[0], "max": ordered[-1]}


def _shard_rows(output_dir: Path, model: str, modality: str, ids: set[str]) -> list[int]:
    folder = output_dir / ShardPaths(model, modality).directory
    rows = []
    for manifest in sorted(folder.glob("*.json")):
        jobs = json.loads(manifest.read_text())["jobs"]
        if ids.intersection(jobs):
            rows.append(len(jobs))
    return rows


class EndToEnd:
    """One end-to-end mode: its redis-server, its worker process, and its measurements.

    Used as a context manager; `throughput` can be called several times (interleaved with the
    other modes' runs), then `latency` once, then `report`.
    """

    def __init__(self, plan: E2EPlan) -> None:
        self.plan = plan
        self.output_dir = plan.workdir / f"out-{plan.mode}"
        self.runs: list[dict[str, Any]] = []
        self.latency_passes = 0
        self.observed_latency: list[float] = []

    def __enter__(self) -> EndToEnd:
        shutil.rmtree(self.output_dir, ignore_errors=True)
        self.server = start_redis_server()
        self.settings = {
            "redis_url": self.server.url, "model": self.plan.spec,
            "local_root": str(self.plan.image_dir), "output_uri": self.output_dir.as_uri(),
            "device": self.plan.device, "dtype": self.plan.dtype,
            "health_dir": str(self.plan.workdir / f"health-{self.plan.mode}"),
            "drain_timeout_s": 5, **self.plan.settings, **self.plan.worker_settings,
        }
        try:
            self.watched = start_watched(
                _worker_args(self.plan), clean_env(self.settings, self.plan.torch_threads),
                self.plan.workdir / f"{self.plan.mode}-worker.log")
        except BaseException:
            self._stop_redis()
            raise
        self.redis_ps = psutil.Process(self.server.process.pid)
        settings = Settings(_env_file=None,  # type: ignore[call-arg]
                            redis_url=SecretStr(self.server.url), model=self.plan.spec)
        self.results = ResultStore(redis_client(settings), RedisKeys(settings.key_prefix),
                                   settings.result_ttl_s)
        self.submitter = Submitter(self.plan, settings)
        return self

    def __exit__(self, *_: object) -> None:
        try:
            self.watched.stop()
        finally:
            self._stop_redis()

    def _stop_redis(self) -> None:
        self.server.stop()
        shutil.rmtree(self.server.directory, ignore_errors=True)

    def warm_up(self) -> None:
        """The model loads, label embeddings are cached, the first batches run."""
        jobs = make_jobs(self.plan, "warm", self.plan.warmup_jobs)
        self.submitter.one(jobs[0])
        _wait_all(self.results, [jobs[0].job_id], self.watched, READY_TIMEOUT_S, 0.05)
        self.submitter.bulk(jobs[1:])
        _wait_all(self.results, [j.job_id for j in jobs[1:]], self.watched, READY_TIMEOUT_S,
                  0.05)
        self.rss_after_warmup = self.watched.rss()

    def throughput(self, profile: bool = False) -> dict[str, Any]:
        jobs = make_jobs(self.plan, f"tput{len(self.runs)}")
        profiler = (Profiler(self.watched.process.pid,
                             self.plan.workdir / f"{self.plan.mode}-spy.txt", self.plan.profile)
                    if profile and self.plan.profile else None)
        run = self._throughput(jobs)
        if profiler is not None:
            run["profile"] = profiler.stop()
        self.runs.append(run)
        return run

    def _throughput(self, jobs: Sequence[Job]) -> dict[str, Any]:
        ids = [job.job_id for job in jobs]
        cpu = self._cpu()
        window = CpuWindow(lambda: sum(self._cpu().values()))
        start = time.time()
        self.submitter.bulk(jobs)
        submitted = time.time()
        # Texts finish faster than 64 statuses a poll would see them: look at more a poll.
        polled = 512 if self.plan.modality == "text" else 64
        results = _wait_all(self.results, ids, self.watched, 3600, 0.1, polled)
        seen = time.time()
        load = window.close()
        used = {name: after - before for (name, before), after
                in zip(cpu.items(), self._cpu().values(), strict=True)}
        done = [r for r in results if r.status is Status.DONE]
        end = max(r.timings.finished_at or seen for r in results)
        return {"items": len(jobs), "done": len(done), "failed": len(results) - len(done),
                "seconds": end - start, "items_per_s": len(jobs) / (end - start),
                "submit_s": submitted - start, "seen_s": seen - start,
                "cpu_s": used, "cpu_window": load,
                "errors": sorted({r.error.code.value for r in results if r.error})}

    def latency(self) -> list[float]:
        """Single jobs, one at a time, each awaited before the next is sent.

        A job's latency runs from just before its submit to the worker's `finished_at` stamp
        (taken just before the result is stored; same clock, same machine). Results are
        polled only every 10 ms: polling every millisecond takes a fifth of a core from a
        2-core machine and slows a forward pass that uses both. `observed_latency` keeps when
        this process saw each job done."""
        times = []
        self.latency_passes += 1
        for job in make_jobs(self.plan, f"lat{self.latency_passes}", self.plan.latency_jobs):
            submitted, start = time.time(), time.perf_counter()
            self.submitter.one(job)
            result = _wait_all(self.results, [job.job_id], self.watched, 600, 0.01)[0]
            self.observed_latency.append((time.perf_counter() - start) * 1000)
            times.append(((result.timings.finished_at or time.time()) - submitted) * 1000)
        return times

    def report(self, latency_passes: list[list[float]]) -> dict[str, Any]:
        """The best throughput run and the latency pass with the lower median (the machine
        may be shared), with fill over every run's shards and the peak RSS."""
        plan = self.plan
        ids = {job.job_id for repeat in range(len(self.runs))
               for job in make_jobs(plan, f"tput{repeat}")}
        rows = _shard_rows(self.output_dir, plan.spec, plan.modality, ids)
        max_batch = int(str(plan.worker_settings.get("max_batch_items", 1))) \
            if plan.mode == "dualstream" else 1
        best = max(self.runs, key=lambda run: run["items_per_s"])
        profiles = [run.pop("profile") for run in self.runs if "profile" in run]
        return {
            **best, "repeats_items_per_s": [run["items_per_s"] for run in self.runs],
            "repeats_cpu_window": [run["cpu_window"] for run in self.runs],
            "profile": profiles[-1] if profiles else None,
            "latency_ms": min(latency_passes, key=statistics.median),
            "latency_passes_ms": latency_passes,
            "latency_observed_ms": self.observed_latency, "shards": len(rows),
            "rows_per_shard": sum(rows) / len(rows) if rows else 0.0,
            "batch_fill": (sum(rows) / len(rows) / max_batch) if rows else 0.0,
            "max_batch_items": max_batch, "peak_rss_bytes": self.watched.peak_rss(),
            "rss_after_warmup_bytes": self.rss_after_warmup,
            "peak_rss_sampled_bytes": self.watched.peak_rss_sampled,
            "torch_threads": plan.torch_threads,
            "per_message": plan.per_message if plan.mode == "dualstream" else 1,
            "worker_settings": {k: v for k, v in self.settings.items()
                                if k not in ("redis_url", "health_dir")},
            **({"naive_pool": plan.naive_pool, "naive_concurrency": plan.naive_concurrency}
               if plan.mode == "naive" else {}),
        }

    def _cpu(self) -> dict[str, float]:
        redis_times = self.redis_ps.cpu_times()
        bench_times = psutil.Process().cpu_times()
        return {"worker": self.watched.cpu_s(),
                "redis": redis_times.user + redis_times.system,
                "bench": bench_times.user + bench_times.system}
