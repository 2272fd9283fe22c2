"""`dualstream demo`: the whole system on one machine with embedded defaults.

A private redis-server (unless DUALSTREAM_REDIS_URL is set), a local folder as object store, a
tiny model from the factory (unless --model is given), sample images, a real worker process,
the folder's images submitted, and the labels printed at the end: stdout holds only the
results; the worker's banner and logs go to `<workdir>/worker.log`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import click
from PIL import Image, ImageDraw
from pydantic import SecretStr

from producer.bulk import BulkRequest, jobs_for, list_sources
from producer.client import Client
from schemas.jobs import ZeroShotOptions
from schemas.settings import Settings
from worker.local import redis_server

SAMPLE_COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
                  "yellow": (240, 220, 40), "black": (10, 10, 10), "white": (245, 245, 245)}


def make_sample_images(folder: Path) -> list[Path]:
    """Six 640x480 JPEGs: a coloured background with a contrasting disc and bars."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, colour) in enumerate(SAMPLE_COLOURS.items()):
        image = Image.new("RGB", (640, 480), colour)
        draw = ImageDraw.Draw(image)
        inverse = tuple(255 - c for c in colour)
        draw.ellipse((100 + 30 * i, 80, 380 + 30 * i, 360), fill=inverse)
        for x in range(0, 640, 80):
            draw.rectangle((x, 420, x + 40 - 4 * i, 470), fill=(x % 255, 128, 255 - x % 255))
        path = folder / f"{i:02d}-{name}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


@contextmanager
def worker_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as handle:
        process = subprocess.Popen([sys.executable, "-m", "dualstream.cli", "worker",
                                    "--loglevel", "WARNING"], env=env, stdout=handle,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def run_demo(workdir: Path, model: str | None, labels: list[str], images: Path | None) -> None:
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if model is None:
        from worker.models.tiny import build_tiny_model

        click.echo("building a tiny OpenCLIP model (random weights: labels are arbitrary)",
                   err=True)
        model = build_tiny_model("openclip", workdir / "tiny-openclip")
    folder = images.resolve() if images else workdir / "images"
    if images is None:
        make_sample_images(folder)
    own_redis = "DUALSTREAM_REDIS_URL" not in os.environ
    with redis_server() if own_redis else nullcontext() as server:
        env = {**os.environ, "DUALSTREAM_MODEL": model, "DUALSTREAM_LOCAL_ROOT": str(folder),
               "DUALSTREAM_OUTPUT_URI": (workdir / "out").as_uri()}
        if server is not None:
            env["DUALSTREAM_REDIS_URL"] = server.url
        env.setdefault("DUALSTREAM_REDIS_URL", Settings().redis_dsn)
        settings = Settings(redis_url=SecretStr(env["DUALSTREAM_REDIS_URL"]), model=model,
                            local_root=str(folder), output_uri=env["DUALSTREAM_OUTPUT_URI"])
        client = Client(settings)
        request = BulkRequest(source=str(folder), model=model,
                              zero_shot=ZeroShotOptions(labels=labels, top_k=3))
        log = workdir / "worker.log"
        click.echo(f"starting a worker (its log: {log})", err=True)
        with worker_process(env, log):
            start = time.monotonic()
            jobs = list(jobs_for(request, list_sources(str(folder), request.suffixes)))
            # Single submissions: a job that failed before (an image since fixed) runs
            # again, and the wait is for its new outcome.
            ids = client.submit_many(jobs)
            results = client.wait(ids, timeout=300)
            elapsed = time.monotonic() - start
        for job, result in zip(jobs, results, strict=True):
            top = ", ".join(f"{s.label} {s.score:.3f}" for s in result.labels or [])
            outcome = top if result.error is None else f"FAILED {result.error.code}"
            click.echo(f"{Path(job.source).name:<20} {outcome}")
        click.echo(f"{len(results)} images in {elapsed:.1f} s; embeddings and metadata in "
                   f"{workdir / 'out'}")

