"""One benchmark run: for each model, the three modes on the same JPEGs (or, with
`--modality text`, the same texts, as text-embedding jobs), then the report.

    a. ceiling     one process, no queue: fetch → decode → preprocess → forward → write,
                   at the best batch size (`bench/ceiling.py`)
    b. dualstream  producer → Redis → `dualstream worker` → outputs (`bench/e2e.py`)
    c. naive       producer → Redis → one Celery task per image (`bench/naive.py`)

In text mode the ceiling tokenizes each batch on a thread while the batch before it is
forwarded, then writes it; b and c take text-embedding jobs through the same paths as images.

The report is a dict (written as JSON) and a Markdown table; `render_table` makes the table.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from bench.ceiling import CeilingConfig, CeilingProcess
from bench.e2e import E2EPlan, EndToEnd, make_jobs, percentiles
from bench.images import SIZES, Size, corpus_summary, make_corpus
from bench.models import DEFAULT_CACHE, model_spec
from bench.plan import ModelPlan
from bench.procs import REPO, clean_env
from bench.texts import make_texts, texts_summary

LABELS = ["cat", "dog", "car", "tree", "house", "person", "bird", "boat", "flower", "mountain"]
MIB = 1024 * 1024

MODES = ("ceiling", "dualstream", "naive")


@dataclass(frozen=True)
class BenchOptions:
    models: tuple[str, ...]
    modes: tuple[str, ...]
    plans: dict[str, ModelPlan]
    workdir: Path
    model_cache: Path = DEFAULT_CACHE
    modality: str = "image"  # or "text": text-embedding jobs on generated captions
    device: str = "cpu"
    dtype: str = "fp32"
    settings: dict[str, str] = field(default_factory=dict)  # DUALSTREAM_* for every mode
    command: str = ""
    profile: str | None = None
    image_sizes: tuple[Size, ...] = SIZES


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip()
                  for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu_model": model, "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
            "platform": platform.platform(), "python": platform.python_version()}


def code_version() -> dict[str, Any]:
    """The commit benchmarked: git's HEAD, and whether worker/producer/schemas differ from it
    (or `.bench-commit` in an exported tree)."""
    stamp = REPO / ".bench-commit"
    if stamp.is_file():
        return {"commit": stamp.read_text().strip(), "source": "exported tree"}
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "worker",
                            "producer", "schemas"], capture_output=True, text=True,
                           check=False).stdout.strip()
    return {"commit": head or None, "uncommitted_changes": bool(dirty)}


def versions() -> dict[str, str]:
    names = ("torch", "open_clip_torch", "pillow", "celery", "kombu", "redis", "numpy", "pyarrow")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True,
                                   text=True, check=False).stdout.split()
    found["redis-server"] = next((w.split("=", 1)[1] for w in redis_version
                                  if w.startswith("v=")), "?")
    return found


def _ceiling_process(base: E2EPlan, plan: ModelPlan) -> CeilingProcess:
    items = plan.items(base.modality)
    config = CeilingConfig(
        spec=base.spec, image_dir=str(base.image_dir),
        jobs=[job.model_dump(mode="json") for job in make_jobs(base, "ceil")],
        output_dir=str(base.workdir / "out-ceiling"), batch_sizes=list(plan.ceiling_batches),
        sweep_items=min(plan.ceiling_sweep_items, items),
        prepare_threads=plan.ceiling_prepare_threads, torch_threads=plan.ceiling_torch_threads,
        latency_items=min(plan.ceiling_latency_items, items),
        forward_threads=[plan.torch_threads], worker_batch=plan.max_batch_items,
        device=base.device, dtype=base.dtype, modality=base.modality,
        settings=base.settings, repeats=plan.repeats)
    return CeilingProcess(config, base.workdir, clean_env({}, plan.ceiling_torch_threads))


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run_model(name: str, plan: ModelPlan, image_dir: Path, sources: list[str],
              options: BenchOptions) -> dict[str, Any]:
    """The three modes, started once each; their throughput runs interleaved round by round,
    so each round's a, b and c see the same background load on a shared machine."""
    spec = model_spec(name, options.model_cache)
    base = E2EPlan(mode="ceiling", spec=spec, image_dir=image_dir, modality=options.modality,
                   sources=sources[:plan.items(options.modality)], labels=LABELS,
                   workdir=options.workdir / name, torch_threads=plan.torch_threads,
                   latency_jobs=plan.latency_jobs, warmup_jobs=plan.warmup_jobs,
                   repeats=plan.repeats, profile=options.profile, device=options.device,
                   dtype=options.dtype, settings=options.settings)
    plans = {
        "dualstream": replace(base, mode="dualstream", per_message=plan.per_message,
                              worker_settings=plan.worker_settings()),
        "naive": replace(base, mode="naive", torch_threads=plan.naive_torch_threads,
                         naive_pool=plan.naive_pool, naive_concurrency=plan.naive_concurrency),
    }
    with ExitStack() as stack:
        ceiling = None
        if "ceiling" in options.modes:
            _say(f"{name}: a. ceiling: forward timings, latency, batch-size sweep")
            ceiling = stack.enter_context(_ceiling_process(base, plan))
        e2e: dict[str, EndToEnd] = {}
        for mode, mode_plan in plans.items():
            if mode in options.modes:
                _say(f"{name}: {mode}: starting the worker and warming up")
                e2e[mode] = stack.enter_context(EndToEnd(mode_plan))
                e2e[mode].warm_up()
        rounds = []
        for repeat in range(plan.repeats):
            found: dict[str, float] = {}
            if ceiling is not None:
                found["ceiling"] = ceiling.throughput()["items_per_s"]
            for mode, runner in e2e.items():
                last = repeat == plan.repeats - 1
                found[mode] = runner.throughput(profile=last)["items_per_s"]
            _say(f"{name}: round {repeat + 1}/{plan.repeats}: " + ", ".join(
                f"{mode} {value:.1f}/s" for mode, value in found.items()))
            rounds.append({**found, **ratios({m: {"items_per_s": v} for m, v in found.items()})})
        passes: dict[str, list[list[float]]] = {mode: [] for mode in e2e}
        for _ in range(2):  # two passes, interleaved; the better is kept (see EndToEnd.report)
            for mode, runner in e2e.items():
                _say(f"{name}: {mode}: latency at light load")
                passes[mode].append(runner.latency())
        modes = {"ceiling": ceiling.report()} if ceiling is not None else {}
        modes.update({mode: runner.report(passes[mode]) for mode, runner in e2e.items()})
    summary = {mode: summarize(result) for mode in MODES if (result := modes.get(mode))}
    overall: dict[str, float | None] = {
        **ratios(summary), "b_over_bare_forward": over_bare_forward(plan, modes, summary)}
    return {"spec": spec, "plan": asdict(plan), "modes": modes, "summary": summary,
            "rounds": rounds, "ratios": overall,
            "targets": targets(name, plan, modes, summary, overall, options)}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    latency = percentiles(result.get("latency_ms", []))
    cpu = result.get("cpu_s")
    worker_cpu = cpu.get("worker") if isinstance(cpu, dict) else cpu
    total_cpu = sum(cpu.values()) if isinstance(cpu, dict) else cpu
    return {
        "items": result["items"], "items_per_s": result["items_per_s"],
        "latency_p50_ms": latency.get("p50"), "latency_p95_ms": latency.get("p95"),
        "batch_fill": result.get("batch_fill"), "rows_per_shard": result.get("rows_per_shard"),
        "peak_rss_mib": result["peak_rss_bytes"] / MIB,
        "worker_cpu_ms_per_item": 1000 * worker_cpu / result["items"] if worker_cpu else None,
        "total_cpu_ms_per_item": 1000 * total_cpu / result["items"] if total_cpu else None,
        "failed": result.get("failed", 0),
        "others_cores": result.get("cpu_window", {}).get("others_cores"),
    }


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def ratio(top: str, bottom: str) -> float | None:
        if top in summary and bottom in summary and summary[bottom]["items_per_s"]:
            return float(summary[top]["items_per_s"] / summary[bottom]["items_per_s"])
        return None

    return {"b_over_a": ratio("dualstream", "ceiling"), "b_over_c": ratio("dualstream", "naive")}


def over_bare_forward(plan: ModelPlan, modes: dict[str, dict[str, Any]],
                      summary: dict[str, dict[str, Any]]) -> float | None:
    """b's items/s over the bare forward pass's at b's batch size (pixels already on hand)."""
    forward_ms = modes.get("ceiling", {}).get("forward_ms", {}).get(str(plan.max_batch_items))
    items_per_s = summary.get("dualstream", {}).get("items_per_s")
    if not forward_ms or items_per_s is None:
        return None
    return float(items_per_s / (plan.max_batch_items * 1000 / forward_ms))


def targets(name: str, plan: ModelPlan, modes: dict[str, dict[str, Any]],
            summary: dict[str, dict[str, Any]], found: dict[str, float | None],
            options: BenchOptions) -> list[dict[str, Any]]:
    """The issues' targets: (1) tiny: b ≥ 10 c, b ≥ 0.7 a (on texts: b ≥ 0.8 a); (2) ViT-B/16:
    b ≥ 0.95 a; and at light load p50 ≤ max batch wait + one forward pass + 25 ms. On a GPU,
    ViT-B/16 on images also: b at ≥ 5,000 images/s and ≥ 0.8 of the bare forward pass at the
    same batch size."""
    checks: list[dict[str, Any]] = []

    def check(what: str, value: float | None, limit: float | None, at_most: bool) -> None:
        met = None if value is None or limit is None else (
            value <= limit if at_most else value >= limit)
        checks.append({"target": what, "value": value, "limit": limit, "met": met})

    if name == "tiny":
        share = 0.8 if options.modality == "text" else 0.7
        check("b/c >= 10", found["b_over_c"], 10.0, at_most=False)
        check(f"b/a >= {share}", found["b_over_a"], share, at_most=False)
    else:
        check("b/a >= 0.95", found["b_over_a"], 0.95, at_most=False)
        if options.device != "cpu" and options.modality == "image":
            check("b >= 5000 images/s", summary.get("dualstream", {}).get("items_per_s"),
                  5000.0, at_most=False)
            check("b >= 0.8 x bare forward at b's batch size", found["b_over_bare_forward"],
                  0.8, at_most=False)
    forward = modes.get("ceiling", {}).get("forward_batch1_ms_by_threads", {}).get(
        str(plan.torch_threads))
    limit = None if forward is None else plan.max_batch_wait_ms + forward + 25.0
    p50 = summary.get("dualstream", {}).get("latency_p50_ms")
    check(f"b p50 <= wait {plan.max_batch_wait_ms} ms + forward(1) "
          f"{'?' if forward is None else f'{forward:.1f}'} ms + 25 ms", p50, limit, at_most=True)
    return checks


def _inputs(options: BenchOptions, count: int) -> tuple[Path, list[str], dict[str, Any]]:
    """(the workers' local root, each item's image path or text, the report's summary)."""
    if options.modality == "text":
        texts = make_texts(count)
        return options.workdir.resolve(), texts, {"texts": texts_summary(texts)}
    tag = "" if options.image_sizes == SIZES else "-" + "-".join(
        f"{w}x{h}" for w, h in options.image_sizes)
    image_dir = (options.workdir / f"images-{count}{tag}").resolve()
    _say(f"{count} JPEGs in {image_dir}")
    paths = make_corpus(image_dir, count, sizes=options.image_sizes)
    return (image_dir, [str(p) for p in paths],
            {"images": corpus_summary(paths, options.image_sizes), "labels": LABELS})


def run_benchmark(options: BenchOptions) -> dict[str, Any]:
    plans = {name: options.plans[name] for name in options.models}
    options.workdir.mkdir(parents=True, exist_ok=True)
    root, sources, inputs = _inputs(
        options, max(plan.items(options.modality) for plan in plans.values()))
    report: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "command": options.command,
        "machine": machine(), "code": code_version(), "versions": versions(),
        "device": options.device, "dtype": options.dtype, "settings": options.settings,
        "modality": options.modality, **inputs,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "models": {},
    }
    for name, plan in plans.items():
        report["models"][name] = run_model(name, plan, root, sources, options)
    report["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def _fmt(value: object, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def render_table(report: dict[str, Any]) -> str:
    letters = {"ceiling": "a. ceiling", "dualstream": "b. dualstream", "naive": "c. naive"}
    lines = ["| model | mode | items/s | p50 ms | p95 ms | batch fill | rows/shard | "
             "peak RSS MiB | worker CPU ms/item | others' cores |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for name, model in report["models"].items():
        for mode, row in model["summary"].items():
            lines.append(
                f"| {name} | {letters[mode]} | {_fmt(row['items_per_s'])} | "
                f"{_fmt(row['latency_p50_ms'])} | {_fmt(row['latency_p95_ms'])} | "
                f"{_fmt(row['batch_fill'], 2)} | {_fmt(row['rows_per_shard'])} | "
                f"{_fmt(row['peak_rss_mib'], 0)} | {_fmt(row['worker_cpu_ms_per_item'])} | "
                f"{_fmt(row['others_cores'], 2)} |")
        found = model["ratios"]
        notes.append(f"- {name}: b/a = {_fmt(found['b_over_a'], 2)}, "
                     f"b/c = {_fmt(found['b_over_c'], 2)}, b / bare forward = "
                     f"{_fmt(found.get('b_over_bare_forward'), 2)}")
        for check in model["targets"]:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[check["met"]]
            notes.append(f"  - target {check['target']}: {_fmt(check['value'], 2)} "
                         f"(limit {_fmt(check['limit'], 2)}): {verdict}")
    return "\n".join([*lines, "", *notes])
