"""Mode a, the ceiling: fetch → decode → preprocess → forward → write in one process, no queue
(for texts: tokenize → forward → write).

The loop itself is `bench/ceiling_worker.py`; this module starts it in its own process (so its
peak RSS and torch threads are its own) and asks it for throughput runs on demand, so the
benchmark can interleave them with the other modes' runs. Nothing here imports torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.procs import REPO


@dataclass(frozen=True)
class CeilingConfig:
    spec: str
    image_dir: str
    jobs: list[dict[str, Any]]  # Job JSON, one per image, in order
    output_dir: str
    batch_sizes: list[int]
    sweep_items: int
    prepare_threads: int
    torch_threads: int
    latency_items: int
    forward_threads: list[int]  # also time forward(1) at these torch thread counts
    worker_batch: int = 1  # also time the bare forward pass at b's batch size
    repeats: int = 1  # throughput runs are best-of; the sweep too
    device: str = "cpu"
    dtype: str = "fp32"
    settings: dict[str, Any] = field(default_factory=dict)  # DUALSTREAM_* fields, as in b and c
    modality: str = "image"  # or "text": `jobs` are text-embedding jobs



class CeilingProcess:
    """The ceiling in its own process (its own RSS and torch threads), run on demand, so its
    throughput runs can be interleaved with the other modes' runs."""

    def __init__(self, config: CeilingConfig, folder: Path, env: dict[str, str]) -> None:
        self.config = config
        self.folder = folder
        self.env = env
        self.runs: list[dict[str, Any]] = []

    def __enter__(self) -> CeilingProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        config_path = self.folder / "ceiling.json"
        config_path.write_text(json.dumps(asdict(self.config)))
        self.log = self.folder / "ceiling.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.ceiling_worker", str(config_path)], cwd=REPO,
                env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                text=True)
        self.setup = self._read()
        return self

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(30)
            tail = self.log.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"the ceiling process exited ({self.process.returncode}):\n{tail}")
        message: dict[str, Any] = json.loads(line)
        return message

    def _send(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def throughput(self) -> dict[str, Any]:
        run = self._send("run")
        self.runs.append(run)
        return run

    def report(self) -> dict[str, Any]:
        final = self._send("quit")
        best = max(self.runs, key=lambda run: run["items_per_s"])
        return {**best, **self.setup, **final,
                "repeats_items_per_s": [run["items_per_s"] for run in self.runs],
                "repeats_cpu_window": [run["cpu_window"] for run in self.runs],
                "batch_fill": best["rows_per_shard"] / self.setup["batch_size"]}

    def __exit__(self, *_: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
