"""The worker's commands: `worker`, `demo`, `tiny-model`, `health`.

The `dualstream` root (`dualstream/cli.py`) lists them in every install, so their model-side
imports happen when one runs: without the `[worker]` extra, the root says what is missing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click

from schemas.keys import model_slug, queue_name
from schemas.settings import Settings

if TYPE_CHECKING:
    from celery import Celery


@click.command()
@click.option("--model", default=None, help="model spec to serve (default: DUALSTREAM_MODEL)")
@click.option("--concurrency", type=int, default=None, help="unacknowledged messages held")
@click.option("--processes", type=click.IntRange(min=1), default=None,
              help="worker processes, each with its own model copy "
                   "(default: DUALSTREAM_WORKER_PROCESSES, 1)")
@click.option("--child", type=int, default=None, hidden=True,
              help="set by the supervisor: this child's index, in its Celery node name")
@click.option("--loglevel", default="INFO")
def worker(model: str | None, concurrency: int | None, processes: int | None,
           child: int | None, loglevel: str) -> None:
    """Run a Celery worker for one model's queue (threads pool, late acknowledgement); with
    several processes, a supervisor that runs one such worker in each."""
    settings = Settings()
    overrides = {k: v for k, v in {"model": model, "max_inflight_messages": concurrency,
                                   "worker_processes": processes}.items() if v is not None}
    settings = settings.model_copy(update=overrides)
    if not settings.model:
        raise click.UsageError("no model: pass --model or set DUALSTREAM_MODEL")
    if settings.worker_processes > 1:
        from worker.supervisor import supervise

        logging.basicConfig(level=loglevel.upper(),
                            format="[%(asctime)s: %(levelname)s/supervisor] %(message)s")
        raise SystemExit(supervise(settings, loglevel))
    from worker.celery_app import create_app

    node = "-".join(["dualstream", model_slug(settings.model),
                     *([str(child)] if child is not None else [])])
    status = _run_celery(create_app(settings), [
        "worker", "--pool=threads", f"--concurrency={settings.max_inflight_messages}",
        "-Q", queue_name(settings.model), "-n", f"{node}@%h",
        f"--loglevel={loglevel}", "--without-gossip", "--without-mingle",
    ])
    if status:
        raise SystemExit(status)


def _run_celery(app: Celery, argv: list[str]) -> int:
    """`celery worker ...` for `app`, returning its exit status.

    What `Celery.start` does, minus dropping the status (as `worker_main` does too): a worker
    whose model does not load must exit non-zero, so Kubernetes sees a crash, not a completion.
    """
    from celery.bin.celery import celery as celery_command

    celery_command.params[0].default = app  # the -A option
    try:
        return int(celery_command.main(args=argv, standalone_mode=False) or 0)
    finally:
        celery_command.params[0].default = None


@click.command("tiny-model")
@click.option("--family", type=click.Choice(["align", "openclip", "altclip"]), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def tiny_model(family: str, out: Path) -> None:
    """Build a tiny randomly initialised model of a family; prints the spec that loads it."""
    from worker.models.tiny import build_tiny_model

    click.echo(build_tiny_model(family, out))


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("dualstream-demo"), show_default=True)
@click.option("--model", default=None, help="a real model spec instead of the tiny model")
@click.option("--labels", default="red,green,blue,yellow,black,white", show_default=True)
@click.option("--images", type=click.Path(file_okay=False, exists=True, path_type=Path),
              default=None, help="a folder of your own images instead of the samples")
def demo(workdir: Path, model: str | None, labels: str, images: Path | None) -> None:
    """Run the whole system locally on a folder of images and print the labels."""
    from worker.demo import run_demo

    run_demo(workdir, model, [x.strip() for x in labels.split(",")], images)


@click.command()
@click.argument("which", type=click.Choice(["live", "ready"]))
@click.option("--max-age", type=float, default=30.0, show_default=True,
              help="seconds since the worker last confirmed it")
def health(which: str, max_age: float) -> None:
    """Exit 0 if the worker is live (or ready): for Kubernetes exec probes."""
    from worker.health import probe

    if not probe(Path(Settings().health_dir), which, max_age):
        raise SystemExit(1)


COMMANDS = [worker, tiny_model, demo, health]
