"""Liveness and readiness for Kubernetes probes, as files a probe can check cheaply.

A monitor thread in the worker touches `<dir>/live` while the model stage keeps making progress
(it goes stale when the loop is stuck) and keeps `<dir>/ready` present only while Redis answers,
the pipeline is healthy and the worker is not draining after SIGTERM. `dualstream health
live|ready` is the probe command.

With several worker processes (`dualstream worker --processes N`, worker/supervisor.py) each
child keeps its files in its own directory, `<dir>/worker-<i>`, and the probe passes only if
every child's file is fresh: one stuck or dead child fails the pod's probe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(self, directory: Path, *, interval_s: float, stall_s: float,
                 pipeline_ok: Callable[[], bool], last_progress: Callable[[], float],
                 broker_ok: Callable[[], bool]) -> None:
        self._dir = directory
        self._interval_s = interval_s
        self._stall_s = stall_s
        self._pipeline_ok = pipeline_ok
        self._last_progress = last_progress
        self._broker_ok = broker_ok
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ds-health", daemon=True)
        self._last = (False, False)

    def start(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._interval_s + 1)
        (self._dir / "ready").unlink(missing_ok=True)

    def drain(self) -> None:
        """The worker takes no more work: not ready from now on."""
        self._draining.set()
        (self._dir / "ready").unlink(missing_ok=True)

    def check_once(self) -> tuple[bool, bool]:
        live = self._pipeline_ok() and time.monotonic() - self._last_progress() < self._stall_s
        ready = live and not self._draining.is_set() and self._broker_ok()
        if live:
            (self._dir / "live").touch()
        ready_file = self._dir / "ready"
        if ready and not self._draining.is_set():
            ready_file.touch()
        else:
            ready_file.unlink(missing_ok=True)
        self._last = (live, ready)
        return live, ready

    def last(self) -> tuple[bool, bool]:
        """(live, ready) as the last check found them, for the HTTP probes; a drain makes the
        worker unready at once."""
        live, ready = self._last
        return live, ready and not self._draining.is_set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
            except Exception:  # the monitor must outlive any one failed check
                log.exception("health check failed")
            self._stop.wait(self._interval_s)


CHILD_PREFIX = "worker-"


def child_directory(directory: Path, index: int) -> Path:
    """Where child `index` of a supervised worker keeps its files."""
    return directory / f"{CHILD_PREFIX}{index}"


def probe(directory: Path, which: str, max_age_s: float) -> bool:
    """What a Kubernetes exec probe runs: is the file there and fresh enough (in every child's
    directory, if the worker has children)?"""
    children = sorted(directory.glob(f"{CHILD_PREFIX}*"))
    return all(_fresh(place / which, max_age_s) for place in children or [directory])


def _fresh(path: Path, max_age_s: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime < max_age_s
    except FileNotFoundError:
        return False
