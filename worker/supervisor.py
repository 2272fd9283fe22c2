"""Several worker processes for one model on one machine: `dualstream worker --processes N`.

Why processes: a worker process runs Celery's consumer and task threads, the tokenizer, the
batcher and the writer under one interpreter lock, so it uses little more than one core however
many the machine has. On texts with the tiny model one process reached 0.45 of the in-process
ceiling, two on one queue 0.7-1.05 (BENCHMARKS.md, "Texts"). Each process is a whole worker:
its own interpreter, model copy and in-flight list; on a GPU they share the device (the
children inherit `CUDA_VISIBLE_DEVICES`).

The supervisor has one job. It starts N children, each a plain one-process `dualstream worker`
(Celery node `dualstream-<slug>-<i>@%h`, health files in `<health_dir>/worker-<i>`, which the
probe checks all of: worker/health.py); it forwards SIGTERM and SIGINT to them, and each drains
as a lone worker does; it exits once every child has exited, non-zero if any failed.

A child that exits unasked (a crash, the OOM killer's SIGKILL, a model that does not load)
makes the supervisor stop the others (SIGTERM: they drain) and exit with that child's status,
so Kubernetes restarts the container. It does not restart the child itself: a pod fails as a
single-process worker does, its restarts, their back-off and their reasons (OOMKilled) stay
visible to Kubernetes and the operator rather than hidden behind a pod that looks running,
and there is no second restart policy to tune. Nothing is lost meanwhile: the dead child's
held messages go back on the queue within `heartbeat_ttl_s` (control/inflight.py), and the
others settle or requeue theirs while they drain.

Children run in their own process group, so a terminal's Ctrl-C reaches them once (forwarded),
not twice (Celery's second SIGINT is a cold shutdown); they get SIGTERM if the supervisor
itself dies (Linux), so none is left orphaned.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from schemas.settings import Settings
from worker.health import CHILD_PREFIX, child_directory

log = logging.getLogger(__name__)

POLL_S = 0.2
FORWARDED = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Launch:
    """How to start one child: its command line and its environment."""

    argv: list[str]
    env: dict[str, str]


def supervise(settings: Settings, loglevel: str) -> int:
    """Run `settings.worker_processes` workers until all have exited; the exit status."""
    count = settings.worker_processes
    _reset_health(Path(settings.health_dir), count)
    launches = [Launch(child_argv(settings, loglevel, i), child_env(settings, i, os.environ))
                for i in range(count)]
    log.info("starting %d worker processes for %s", count, settings.model)
    return Supervisor(launches).run()


def child_argv(settings: Settings, loglevel: str, index: int) -> list[str]:
    return [sys.executable, "-m", "dualstream.cli", "worker", "--processes", "1",
            "--child", str(index), "--model", settings.model,
            "--concurrency", str(settings.max_inflight_messages), "--loglevel", loglevel]


def child_env(settings: Settings, index: int, environ: Mapping[str, str],
              cores: int | None = None) -> dict[str, str]:
    """The supervisor's environment, with the child's health directory and, unless set, torch
    threads that share the cores: cores // N each (at least one)."""
    env = dict(environ)
    env["DUALSTREAM_WORKER_PROCESSES"] = "1"
    env["DUALSTREAM_HEALTH_DIR"] = str(child_directory(Path(settings.health_dir), index))
    if settings.worker_devices:
        # One worker per GPU: the child sees only its device, as device 0.
        env["CUDA_VISIBLE_DEVICES"] = settings.worker_devices[index % len(settings.worker_devices)]
    if settings.metrics_port:
        # One HTTP endpoint per child, on consecutive ports (each serves its own /metrics and
        # probes; `dualstream health` checks every child's files).
        env["DUALSTREAM_METRICS_PORT"] = str(settings.metrics_port + index)
    if "OMP_NUM_THREADS" not in env:
        cores = cores or len(os.sched_getaffinity(0))
        env["OMP_NUM_THREADS"] = str(max(1, cores // settings.worker_processes))
    return env


def _reset_health(directory: Path, count: int) -> None:
    """One empty directory per child, none left from an earlier run: the probe fails until
    every child has written its files."""
    for stale in directory.glob(f"{CHILD_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    for name in ("live", "ready"):
        (directory / name).unlink(missing_ok=True)
    for index in range(count):
        child_directory(directory, index).mkdir(parents=True)


class Supervisor:
    def __init__(self, launches: list[Launch]) -> None:
        self._launches = launches
        self._children: list[subprocess.Popen[bytes]] = []
        self._stopping = False
        self._failure: int | None = None  # the status of the first child that exited unasked

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in FORWARDED}
        try:
            for launch in self._launches:
                if not self._stopping:
                    self._children.append(_spawn(launch))
            while self._any_running():
                self._check_children()
                time.sleep(POLL_S)
            self._check_children()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.status()

    def status(self) -> int:
        """The first unasked exit's status, else the first failed child's, else 0."""
        if self._failure is not None:
            return self._failure
        return next((s for c in self._children if (s := _status(c.returncode))), 0)

    def _any_running(self) -> bool:
        running = [child for child in self._children if child.poll() is None]  # polls them all
        return bool(running)

    def _on_signal(self, signum: int, _: FrameType | None) -> None:
        log.info("signal %s: passing it to %d worker processes", signum, len(self._children))
        self._stop(signum)

    def _check_children(self) -> None:
        if self._stopping:
            return
        for index, child in enumerate(self._children):
            if child.returncode is not None:
                self._failure = _status(child.returncode) or 1
                log.error("worker process %d exited unasked (status %s): stopping the others",
                          index, child.returncode)
                self._stop(signal.SIGTERM)
                return

    def _stop(self, signum: int) -> None:
        self._stopping = True
        for child in self._children:
            child.send_signal(signum)  # a no-op for a child that has exited


def _status(returncode: int | None) -> int:
    """A child's exit status as a shell reports it: 128 + N when signal N killed it."""
    if returncode is None or returncode >= 0:
        return returncode or 0
    return 128 - returncode


def _spawn(launch: Launch) -> subprocess.Popen[bytes]:
    return subprocess.Popen(launch.argv, env=launch.env, stdin=subprocess.DEVNULL,
                            process_group=0, preexec_fn=_die_with_parent())


def _die_with_parent() -> Callable[[], None] | None:
    """In the child before it runs: SIGTERM when the supervisor dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls it

    def arrange() -> None:
        with contextlib.suppress(Exception):
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return arrange
