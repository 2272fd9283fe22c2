"""Worker processes for the end-to-end modes: start, watch (RSS, CPU), stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def clean_env(settings: dict[str, object], torch_threads: int) -> dict[str, str]:
    """The bench's environment without any DUALSTREAM_*, plus the given settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALSTREAM_")}
    env["PYTHONPATH"] = str(REPO)
    env["HF_HUB_OFFLINE"] = "1"
    env["OMP_NUM_THREADS"] = str(torch_threads)
    for name, value in settings.items():
        env[f"DUALSTREAM_{name.upper()}"] = str(value)
    return env


def _tree(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return []


def _vm_hwm(pid: int) -> int:
    """The kernel's peak resident set size of one process, in bytes (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Watched:
    """A started process with an RSS sampler over its whole process tree."""

    process: subprocess.Popen[bytes]
    log: Path
    interval_s: float = 0.5  # VmHWM gives the exact peak; sampling is a cross-check
    peak_rss_sampled: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.process.pid)
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_rss_sampled = max(self.peak_rss_sampled, self.rss())

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

    def cpu_s(self) -> float:
        """User + system CPU seconds of the process and its live children."""
        total = 0.0
        for proc in _tree(self.ps):
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                continue
        return total

    def rss(self) -> int:
        """Resident set size now, summed over the process tree, in bytes."""
        total = 0
        for proc in _tree(self.ps):
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total

    def peak_rss(self) -> int:
        """Peak RSS: the sum of VmHWM over the process tree (exact for one process)."""
        return sum(_vm_hwm(proc.pid) for proc in _tree(self.ps))

    def stop(self, timeout: float = 30) -> int | None:
        self._stop.set()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_watched(args: list[str], env: dict[str, str], log: Path) -> Watched:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as handle:
        process = subprocess.Popen([sys.executable, *args], env=env, stdout=handle,
                                   stderr=subprocess.STDOUT, cwd=REPO)
    return Watched(process, log)


def wait_until(condition: Callable[[], bool], watched: Watched, timeout: float, what: str,
               poll_s: float = 0.05) -> None:
    """Poll `condition()` until true; fail early, with the log's tail, if the process dies."""
    deadline = time.monotonic() + timeout
    while not condition():
        if not watched.alive():
            raise RuntimeError(f"{what}: the process exited:\n{watched.output()[-4000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: timed out after {timeout} s:\n{watched.output()[-4000:]}")
        time.sleep(poll_s)


def machine_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all processes, all cores)."""
    times = psutil.cpu_times()
    return float(sum(getattr(times, name, 0.0) for name in
                     ("user", "nice", "system", "irq", "softirq", "steal")))


@dataclass
class CpuWindow:
    """How busy the machine was over a phase, and how much of that was someone else's.

    The benchmark machine may be shared; `others_cores` is the average number of cores used
    by processes outside the benchmark while the phase ran, so a reader can judge the number.
    """

    own: Callable[[], float]
    start_wall: float = field(default_factory=time.monotonic)
    start_machine: float = field(default_factory=machine_cpu_s)
    start_own: float = 0.0

    def __post_init__(self) -> None:
        self.start_own = self.own()

    def close(self) -> dict[str, float]:
        wall = time.monotonic() - self.start_wall
        machine = (machine_cpu_s() - self.start_machine) / wall
        own = (self.own() - self.start_own) / wall
        return {"machine_busy_cores": round(machine, 2), "benchmark_cores": round(own, 2),
                "others_cores": round(max(0.0, machine - own), 2)}
