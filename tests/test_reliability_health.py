"""Health: readiness is false while Redis is unreachable and comes back with Redis; liveness
goes stale when the worker's model loop is stuck. (Readiness also drops at SIGTERM: see
tests/test_reliability_drain.py.)

Both are checked through `dualstream health live|ready`, the Kubernetes probe command. The
stuck loop is a test-only fault installed in the worker process (tests/fixtures/faults.py):
the model stage blocks for good on a marker text.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from producer.client import Client
from schemas.settings import Settings
from tests.fixtures.faults import STALL_ON_ENV, owned_redis, wait_for, worker_launcher
from tests.fixtures.services import REPO, worker_env
from worker.health import probe

pytestmark = pytest.mark.timeout(300)
_ = (worker_launcher, owned_redis)  # fixtures

INTERVAL_S = 0.5
STALL_S = 3.0
MAX_AGE_S = 2.0
STALL_TEXT = "the model loop gets stuck on this text"


def probe_cli(health_dir: Path, which: str) -> bool:
    """Exit status 0 of the probe command, as Kubernetes would run it."""
    return subprocess.run(
        [sys.executable, "-m", "dualstream.cli", "health", which, "--max-age", str(MAX_AGE_S)],
        env=worker_env(health_dir=str(health_dir)), cwd=REPO, timeout=60).returncode == 0


def test_ready_tracks_redis_and_live_goes_stale_when_the_model_loop_is_stuck(
        worker_launcher: Any, owned_redis: Any, tiny_model_dirs: dict[str, str],
        tmp_path: Path) -> None:
    server = owned_redis()
    model = tiny_model_dirs["openclip"]
    health = tmp_path / "health"
    worker = worker_launcher(
        {"redis_url": server.url, "model": model, "output_uri": (tmp_path / "out").as_uri(),
         "health_dir": str(health), "health_interval_s": INTERVAL_S,
         "stall_timeout_s": STALL_S}, faults={STALL_ON_ENV: STALL_TEXT})

    def state() -> tuple[bool, bool]:
        return probe(health, "live", MAX_AGE_S), probe(health, "ready", MAX_AGE_S)

    wait_for(lambda: state() == (True, True), 30, "live and ready")
    assert probe_cli(health, "live") and probe_cli(health, "ready")

    server.stop()
    wait_for(lambda: state() == (True, False), 30, "not ready while Redis is down")
    assert probe_cli(health, "live") and not probe_cli(health, "ready")
    server.start()
    wait_for(lambda: state() == (True, True), 30, "ready again once Redis is back")

    client = Client(Settings(redis_url=server.url, model=model))
    client.embed_text(STALL_TEXT, model=model)
    wait_for(lambda: not state()[0], STALL_S + MAX_AGE_S + 30, "liveness to go stale")
    assert not probe_cli(health, "live") and not probe_cli(health, "ready")
    assert worker.process.poll() is None, "stuck, not dead: only the probe can tell"

