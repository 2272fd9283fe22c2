"""The short table `python -m bench.gpu` prints: the steps, parity, throughput, the targets."""

from __future__ import annotations

from typing import Any

IMAGES_PER_S = 5000.0  # ViT-B/16 from JPEG bytes, one H100/H200-class GPU
OVER_BARE_FORWARD = 0.8  # dualstream over the bare fp16 forward pass at the same batch size
MIN_COSINE = 0.999  # fp16/bf16 embeddings against fp32


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def _steps(report: dict[str, Any]) -> list[str]:
    lines = ["| step | status | s | note |", "|---|---|---:|---|"]
    for name, step in report["steps"].items():
        lines.append(f"| {name} | {step['status']} | {_f(step.get('seconds'))} | "
                     f"{step.get('note', '')} |")
    ready = report.get("preflight", {})
    if ready.get("missing_modules") or not ready.get("redis_server"):
        lines.insert(0, f"MISSING: modules {ready.get('missing_modules')}, redis-server "
                        f"{ready.get('redis_server')} (BENCHMARKS.md, 'The GPU path', says what "
                        "to carry)\n")
    device = report["steps"].get("device", {}).get("result") or {}
    name = device.get("name") or "no CUDA device (CPU)"
    lines.insert(0, f"device: {name}, {_f(device.get('memory_gib'))} GiB, torch "
                    f"{device.get('torch', '?')}, CUDA_VISIBLE_DEVICES="
                    f"{device.get('CUDA_VISIBLE_DEVICES')}; wall {_f(report.get('wall_s'))} s "
                    f"of {_f(report.get('budget_s'), 0)} s\n")
    return lines


def _parity(found: dict[str, Any]) -> list[str]:
    lines = ["| model | dtype | image cos min | text cos min | max prob diff | top-1 same |",
             "|---|---|---:|---:|---:|---:|"]
    for model, dtypes in found.items():
        for dtype, row in dtypes.items():
            if isinstance(row, dict):
                lines.append(f"| {model} | {dtype} | {_f(row['image_cosine_min'], 5)} | "
                             f"{_f(row['text_cosine_min'], 5)} | "
                             f"{_f(row['prob_max_abs_diff'], 5)} | {_f(row['top1_same'], 3)} |")
    return lines


def _throughput(found: dict[str, Any]) -> list[str]:
    lines = ["| decoder | batch | ceiling img/s (best batch) | dualstream img/s | "
             "bare forward img/s | dualstream / bare | p50 ms | failed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in found.get("runs", []):
        lines.append(
            f"| {run['decoder']} | {run['batch']} | {_f(run['ceiling_items_per_s'])} "
            f"({_f(run['ceiling_best_batch'])}) | {_f(run['dualstream_items_per_s'])} | "
            f"{_f(run['bare_forward_items_per_s'])} | {_f(run['b_over_bare_forward'], 2)} | "
            f"{_f(run['dualstream_p50_ms'])} | {run['failed']} |")
    return lines


def targets(report: dict[str, Any]) -> list[str]:
    """The issue's targets, judged only on a GPU run; a dry run says so."""
    parity = report["steps"].get("parity", {}).get("result") or {}
    runs = (report["steps"].get("throughput", {}).get("result") or {}).get("runs", [])
    rows = [r for d in parity.values() for r in d.values() if isinstance(r, dict)]
    cos = min((min(r["image_cosine_min"], r["text_cosine_min"]) for r in rows), default=None)
    top1 = min((r["top1_same"] for r in rows), default=None)
    best = max((r["dualstream_items_per_s"] for r in runs), default=None)
    ratio = max((r["b_over_bare_forward"] or 0.0 for r in runs), default=None)
    where = " (dry run on the CPU: not a GPU figure)" if report["dry_run"] else ""
    return [
        f"- dualstream ≥ {IMAGES_PER_S:,.0f} images/s: best {_f(best)}{where}",
        f"- dualstream ≥ {OVER_BARE_FORWARD} × bare forward: best {_f(ratio, 2)}{where}",
        f"- half-precision cosine ≥ {MIN_COSINE}: lowest {_f(cos, 5)}; top-1 unchanged: "
        f"lowest share {_f(top1, 3)}",
    ]


def render(report: dict[str, Any]) -> str:
    parts = _steps(report)
    parity = report["steps"].get("parity", {}).get("result")
    if parity:
        parts += ["", *_parity(parity)]
    throughput = report["steps"].get("throughput", {}).get("result")
    if throughput:
        planned = len(report["params"]["throughput"]["batches"]) * len(
            report["params"]["throughput"]["decoders"])
        parts += ["", f"throughput: {report['params']['throughput']['model']}, "
                  f"{report['params']['throughput']['dtype']}, {throughput['jobs']} jobs on "
                  f"{throughput['distinct_jpegs']} distinct JPEGs; "
                  f"{len(throughput['runs'])} of {planned} runs finished",
                  *_throughput(throughput)]
    return "\n".join([*parts, "", *targets(report)])
