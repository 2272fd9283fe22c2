"""`python -m bench.gpu`: its dry run on the CPU (the same steps as on a GPU, tiny sizes) writes
one JSON and a table, and its deadline stops a slow step in time and says what it skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.procs import REPO


def run_gpu_check(out: Path, *args: str, env: dict[str, str] | None = None,
                  timeout: float = 240) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--dry-run", "--out", str(out),
         "--workdir", str(out / "work"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})})
    return done, time.monotonic() - started


def test_the_dry_run_measures_every_step_and_writes_one_report(tmp_path: Path) -> None:
    # The CUDA tests (all skipped on the CPU) and two of the three tiny families' parity are
    # left out to keep this test short; `python -m bench.gpu --dry-run` runs them all.
    done, _ = run_gpu_check(tmp_path, "--steps", "device,parity,throughput",
                            "--parity-models", "tiny-openclip")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert [step["status"] for step in report["steps"].values()] == ["done"] * 3
    parity = report["steps"]["parity"]["result"]["tiny-openclip"]
    assert parity["fp16"]["image_cosine_min"] > 0.999 and parity["fp16"]["top1_same"] == 1.0
    runs = report["steps"]["throughput"]["result"]["runs"]
    assert [(run["decoder"], run["failed"]) for run in runs] == [("pil", 0), ("torch", 0)]
    assert all(run["dualstream_items_per_s"] > 0 and run["bare_forward_items_per_s"] > 0
               for run in runs)
    assert "| decoder | batch |" in done.stdout and "not a GPU figure" in done.stdout


def test_a_slow_step_is_stopped_at_the_deadline_and_the_rest_is_skipped(tmp_path: Path) -> None:
    budget = 25.0
    # No step before parity: how long one takes (importing torch on a loaded machine) would
    # decide whether parity starts at all, and the test is about stopping it.
    done, wall = run_gpu_check(tmp_path, "--budget-s", str(budget),
                               "--steps", "parity,throughput",
                               env={"DUALSTREAM_GPU_SLOW": "parity:600"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert wall < budget + 5  # the process's own start is outside the budget
    steps = json.loads((tmp_path / "gpu.json").read_text())["steps"]
    assert steps["parity"]["status"] == "stopped" and "deadline" in steps["parity"]["note"]
    assert steps["throughput"]["status"] == "skipped"
    assert "left before the deadline" in steps["throughput"]["note"]
    assert "| parity | stopped |" in done.stdout and "| throughput | skipped |" in done.stdout
