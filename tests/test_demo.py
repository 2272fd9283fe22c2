"""The README's first command: `dualstream demo` (what scripts/demo.sh runs) prints labels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.services import REPO
from worker.demo import SAMPLE_COLOURS


@pytest.mark.timeout(300)
def test_the_demo_prints_labels_for_every_sample_image(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUALSTREAM_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-m", "dualstream.cli", "demo", "--workdir",
                          str(tmp_path / "demo")], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.split()[:1]
             and line.split()[0].endswith(".jpg")]
    assert len(lines) == len(SAMPLE_COLOURS)
    labels = set(SAMPLE_COLOURS)
    for line in lines:
        assert line.split()[1] in labels, line
    assert list((tmp_path / "demo" / "out").rglob("*.npy"))
    # stdout is the results and nothing else: the worker's banner and logs go to its log
    assert run.stdout.splitlines() == [*lines, run.stdout.splitlines()[-1]]
    assert run.stdout.splitlines()[-1].startswith(f"{len(SAMPLE_COLOURS)} images in ")
    assert (tmp_path / "demo" / "worker.log").stat().st_size > 0
