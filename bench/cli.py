"""`python -m bench`: run the benchmark, print the table, write JSON."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from bench.images import SIZES, parse_sizes
from bench.models import DEFAULT_CACHE, MODELS
from bench.plan import DEFAULT_PLANS, apply_overrides
from bench.run import MODES, BenchOptions, render_table, run_benchmark


def _csv(value: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    chosen = tuple(x.strip() for x in value.split(",") if x.strip())
    unknown = [x for x in chosen if x not in allowed]
    if unknown or not chosen:
        raise click.BadParameter(f"{what}: choose from {', '.join(allowed)}")
    return chosen


def _command_line() -> str:
    program = Path(sys.argv[0]).name
    prefix = ["python", "-m", "bench"] if program == "__main__.py" else [program]
    return shlex.join([*prefix, *sys.argv[1:]])


@click.command("bench")
@click.option("--models", default=",".join(MODELS), show_default=True,
              help="comma-separated: tiny, vit-b-16")
@click.option("--modes", default=",".join(MODES), show_default=True,
              help="comma-separated: ceiling (a), dualstream (b), naive (c)")
@click.option("--modality", type=click.Choice(["image", "text"]), default="image",
              show_default=True, help="what the jobs embed: images (zero-shot jobs) or texts "
                                      "(text-embedding jobs)")
@click.option("--texts", type=int, default=None,
              help="texts for the tiny model in text mode "
                   f"[default {DEFAULT_PLANS['tiny'].texts}]")
@click.option("--images", type=int, default=None,
              help=f"images for the tiny model [default {DEFAULT_PLANS['tiny'].images}]")
@click.option("--vit-images", type=int, default=None,
              help=f"images for ViT-B/16 [default {DEFAULT_PLANS['vit-b-16'].images}]")
@click.option("--worker-processes", type=click.IntRange(min=1), default=None,
              help="b's worker processes on one queue, each with the plan's torch threads "
                   "[default 1]")
@click.option("--image-sizes", default=",".join(f"{w}x{h}" for w, h in SIZES),
              show_default=True, help="JPEG sizes to cycle through (WxH,...)")
@click.option("--set", "overrides", multiple=True, metavar="MODEL.FIELD=VALUE",
              help="override a plan field (see bench/plan.py), e.g. tiny.max_batch_items=64; "
                   "MODEL.worker.NAME=VALUE passes DUALSTREAM_NAME to the worker")
@click.option("--setting", "settings", multiple=True, metavar="NAME=VALUE",
              help="a DUALSTREAM_ setting for all three modes (e.g. jpeg_draft=true), so they "
                   "stay comparable")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu",
              show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32",
              show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/tmp/dualstream-bench"), show_default=True,
              help="images, outputs and logs")
@click.option("--profile", type=click.Choice(["gil", "cpu"]), default=None,
              help="py-spy the b and c workers during their last throughput run (needs py-spy)")
@click.option("--model-cache", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CACHE, show_default=True, help="where the random checkpoints live")
@click.option("--redis-cost", "redis_cost_jobs", type=int, default=None, metavar="JOBS",
              help="also measure what a bulk job costs Redis (bench/redis_cost.py) with JOBS "
                   "jobs, 32 a message, 5 labels; --modes '' for that section alone")
@click.option("--redis-cost-baseline", default=None, metavar="GIT-REV",
              help="measure the code at GIT-REV the same way, in the same run")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="write the JSON report here [default WORKDIR/bench.json]")
def bench_command(models: str, modes: str, modality: str, texts: int | None,
                  images: int | None, vit_images: int | None, worker_processes: int | None,
                  image_sizes: str, overrides: tuple[str, ...], settings: tuple[str, ...],
                  device: str, dtype: str,
                  workdir: Path, profile: str | None, model_cache: Path,
                  redis_cost_jobs: int | None, redis_cost_baseline: str | None,
                  json_out: Path | None) -> None:
    """Throughput and latency: ceiling vs dualstream vs naive Celery, tiny and ViT-B/16, on
    images or (`--modality text`) on texts."""
    sized = list(overrides)
    if texts is not None:
        sized.insert(0, f"tiny.texts={texts}")
    if images is not None:
        sized.insert(0, f"tiny.images={images}")
    if vit_images is not None:
        sized.insert(0, f"vit-b-16.images={vit_images}")
    if worker_processes is not None:
        sized[:0] = [f"{name}.worker_processes={worker_processes}" for name in MODELS]
    try:
        plans = apply_overrides(DEFAULT_PLANS, sized)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    options = BenchOptions(
        models=_csv(models, MODELS, "--models"),
        modes=_csv(modes, MODES, "--modes") if modes.strip() or not redis_cost_jobs else (),
        plans=plans, workdir=workdir.resolve(), modality=modality, device=device, dtype=dtype,
        settings=_settings(settings),
        command=_command_line(), profile=profile, model_cache=model_cache,
        image_sizes=parse_sizes(image_sizes))
    report = run_benchmark(options) if options.modes else {"command": options.command}
    if redis_cost_jobs:
        from bench import redis_capacity
        from bench.redis_cost import render, section

        report["redis_cost"] = section(redis_cost_jobs, 32, 5, 64, redis_cost_baseline)
        report["redis_cost"]["capacity"] = redis_capacity.measure()
        if redis_cost_baseline:
            report["redis_cost"]["baseline"]["capacity"] = redis_capacity.baseline(
                redis_cost_baseline)
    target = json_out or workdir / "bench.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2))
    if options.modes:
        click.echo(render_table(report))
    if redis_cost_jobs:
        click.echo(render(report["redis_cost"], report["redis_cost"].get("baseline")))
    click.echo(f"\nJSON report: {target}")


def _settings(pairs: tuple[str, ...]) -> dict[str, str]:
    from schemas.settings import Settings

    found = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in Settings.model_fields or not value:
            raise click.BadParameter(f"{pair!r}: use NAME=VALUE with a field of "
                                     "schemas/settings.py", param_hint="--setting")
        found[name] = value
    return found
