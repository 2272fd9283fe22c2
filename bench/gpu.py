"""The GPU path in one short run: what the device is, the CUDA-only tests, fp16/bf16 parity
against fp32, and ViT-B/16 fp16 throughput from JPEG bytes (the ceiling, dualstream end to end,
the bare forward pass) with the Pillow path and with nvJPEG; one JSON and a short table.

    python -m bench.gpu --out DIR            # on a CUDA device (device 0: see below)
    python -m bench.gpu --out DIR --dry-run  # the same steps on the CPU, tiny sizes

Every step runs in its own process group under one global deadline (`--budget-s`, counted
from `--since`, an epoch time, default now): a step is given what is left, killed with its
children (workers, redis-server) when that runs out, and a step that does not fit is skipped;
the report says which and why. What a step finished before it was stopped is kept.

The device is `cuda`, that is device 0 of what `CUDA_VISIBLE_DEVICES` shows (all of the
machine's GPUs when it is unset); set that variable to measure another one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.gpu_report import render

# Only the standard library here: the report must come out even where the steps cannot run.
REPO = Path(__file__).resolve().parents[1]

CUDA_TESTS = ["tests/test_tensor_decode.py", "tests/test_staging.py", "-k", "on_a_gpu"]
RESERVE_S = 5.0  # kept back from every step, to stop it and write the report


@dataclass(frozen=True)
class Step:
    name: str
    min_s: float  # not started with less time left than this
    cap_s: float  # never given more than this


def plan(dry_run: bool, workdir: Path) -> dict[str, dict[str, Any]]:
    """Each step's parameters: full size on a GPU, tiny on the CPU."""
    device = "cpu" if dry_run else "cuda"
    parity_models = ["tiny-align", "tiny-openclip", "tiny-altclip"]
    if not dry_run:
        parity_models += ["vit-b-16", "full-align", "full-altclip"]
    throughput: dict[str, Any] = {
        "model": "tiny", "device": "cpu", "dtype": "fp32", "batches": [16],
        "images": 96, "distinct": 32, "corpus_processes": 2,
        "plan": {"repeats": 1, "warmup_jobs": 4, "latency_jobs": 2, "ceiling_sweep_items": 32,
                 "ceiling_latency_items": 2},
    } if dry_run else {
        "model": "vit-b-16", "device": "cuda", "dtype": "fp16", "batches": [128, 256],
        "images": 8192, "distinct": 512, "corpus_processes": 16,
        "plan": {"repeats": 1, "warmup_jobs": 256, "latency_jobs": 4,
                 "ceiling_sweep_items": 2048, "ceiling_latency_items": 2,
                 "ceiling_prepare_threads": 12, "ceiling_torch_threads": 4, "torch_threads": 4,
                 "max_batch_wait_ms": 20, "max_inflight_messages": 64, "per_message": 64,
                 "fetch_threads": 16, "preprocess_threads": 12},
    }
    return {
        "device": {"device": device},
        "parity": {"device": device, "models": parity_models, "dtypes": ["fp16", "bf16"],
                   "images": 16},
        "throughput": {**throughput, "decoders": ["pil", "torch"], "workdir": str(workdir),
                       "settings": {} if dry_run else {"channels_last": "true"}},
    }


STEPS = {
    "device": Step("device", 5, 60),
    "cuda_tests": Step("cuda_tests", 20, 150),
    "parity": Step("parity", 15, 150),
    "throughput": Step("throughput", 20, 600),
}


class Deadline:
    def __init__(self, since: float, budget_s: float) -> None:
        self.at = since + budget_s

    def left(self) -> float:
        return self.at - time.time() - RESERVE_S


def run_step(step: Step, command: list[str], deadline: Deadline, log: Path,
             out: Path | None = None) -> dict[str, Any]:
    """Run one step's process group within the deadline; its record for the report."""
    left = deadline.left()
    if left < step.min_s:
        return {"status": "skipped", "note": f"needs at least {step.min_s:.0f} s, "
                f"{max(left, 0):.0f} s left before the deadline"}
    limit = min(step.cap_s, left)
    started = time.time()
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                   start_new_session=True)
        try:
            code = process.wait(limit)
            status = "done" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = "stopped"
    record: dict[str, Any] = {"status": status, "seconds": round(time.time() - started, 1)}
    if status == "stopped":
        record["note"] = f"stopped after {limit:.0f} s (its share of the deadline); " \
            "what it finished is kept"
    if status.startswith("failed"):
        record["log_tail"] = log.read_text(errors="replace")[-3000:]
        record["note"] = (record["log_tail"].strip().splitlines() or [""])[-1][:160]
    if out is not None and out.is_file():
        record["result"] = json.loads(out.read_text())
    return record


# What the steps import and run that a bare CUDA image may lack (see BENCHMARKS.md).
NEEDED_MODULES = ("torch", "torchvision", "transformers", "open_clip", "PIL", "numpy", "pyarrow",
                  "celery", "kombu", "redis", "boto3", "pydantic", "pydantic_settings",
                  "psutil", "pytest")


def preflight() -> dict[str, Any]:
    """Which of the modules and programs the steps need are missing here."""
    from importlib.util import find_spec

    missing = [name for name in NEEDED_MODULES if find_spec(name) is None]
    return {"python": sys.executable, "missing_modules": missing,
            "redis_server": shutil.which("redis-server")}


def _command(name: str, params: dict[str, Any], folder: Path) -> tuple[list[str], Path | None]:
    if name == "cuda_tests":
        return [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                *CUDA_TESTS], None
    params_path = folder / f"{name}-params.json"
    params_path.write_text(json.dumps(params))
    out = folder / f"{name}-result.json"
    out.unlink(missing_ok=True)
    return [sys.executable, "-m", "bench.gpu_steps", name, str(params_path), str(out)], out


def run(args: argparse.Namespace) -> dict[str, Any]:
    deadline = Deadline(args.since, args.budget_s)
    work = args.workdir / "work"
    work.mkdir(parents=True, exist_ok=True)
    params = plan(args.dry_run, work / "throughput")
    if args.parity_models:
        params["parity"]["models"] = args.parity_models.split(",")
    report: dict[str, Any] = {
        "command": " ".join(sys.argv), "dry_run": args.dry_run, "budget_s": args.budget_s,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(args.since)),
        "params": params, "preflight": preflight(), "steps": {},
    }
    for name in args.steps:
        command, out = _command(name, params.get(name, {}), work)
        print(f"[gpu] {name}: {deadline.left():.0f} s left", file=sys.stderr, flush=True)
        report["steps"][name] = run_step(STEPS[name], command, deadline,
                                         args.out / f"{name}.log", out)
        print(f"[gpu] {name}: {report['steps'][name]['status']}", file=sys.stderr, flush=True)
    report["wall_s"] = round(time.time() - args.since, 1)
    return report


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="gpu.json and logs go here")
    parser.add_argument("--dry-run", action="store_true", help="the CPU, tiny sizes")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="the global deadline, from --since (default 480 s)")
    parser.add_argument("--since", type=float, default=None,
                        help="epoch seconds the budget counts from (default: now)")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated, in order (default {','.join(STEPS)})")
    parser.add_argument("--parity-models", default="",
                        help="comma-separated (default: the three tiny families, and on a GPU "
                             "vit-b-16, full-align, full-altclip)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dualstream-gpu"),
                        help="models, JPEGs and the workers' outputs")
    args = parser.parse_args(argv)
    args.since = time.time() if args.since is None else args.since
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(args.steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}: use {', '.join(STEPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
