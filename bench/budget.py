"""Where an image's CPU time goes: each stage of the worker timed alone, on one thread.

    python -m bench.budget [--model tiny|vit-b-16] [--images 64] [--workdir DIR]

CPU time (`time.process_time`, best of 3 passes) per image for: reading the file, the safe
decode, the model's preprocessing (resize, crop, to-tensor, normalise; and, of it, the resize:
both bench models are OpenCLIP, whose transform starts with a bicubic resize of the shortest
side to the encoder's `draft_side`),
the forward pass at batch 1 and at a full batch, zero-shot scoring, and writing a shard with
its claims and results in Redis (at 1 row and at a full batch). Also the same decode with
`jpeg_draft` (libjpeg's DCT-domain downscaling, `decode_image(..., draft_side=)`), and with
`image_decoder=torch` (torchvision's decoder and tensor resize, one image at a time), both
opt-in settings of the worker. Run it on a quiet machine: it measures one thread, so others' load
matters less than for throughput, but not nothing.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from bench.images import make_corpus
from bench.models import DEFAULT_CACHE, model_spec

LABELS = ["cat", "dog", "car", "tree", "house", "person", "bird", "boat", "flower", "mountain"]


def _cpu_ms(step: Callable[[], object], count: int, passes: int = 3) -> float:
    best = math.inf
    for _ in range(passes):
        start = time.process_time()
        step()
        best = min(best, time.process_time() - start)
    return 1000 * best / count


def _write_cost(rows: int, repeats: int) -> float:
    """CPU ms per row for ShardWriter.write (reserve, write the shard, commit) on a private
    redis-server."""
    import numpy as np
    from pydantic import SecretStr

    from control.connections import redis_client
    from control.objects import LocalOutputStore
    from control.results import ResultStore
    from schemas.jobs import Job, Task, ZeroShotOptions
    from schemas.keys import RedisKeys
    from schemas.results import LabelScore
    from schemas.settings import Settings
    from worker.local import redis_server
    from worker.outputs import OutputRow, ShardWriter

    options = ZeroShotOptions(labels=LABELS, top_k=3)
    labels = [LabelScore(label=label, score=0.1) for label in LABELS[:3]]
    with redis_server() as server, tempfile.TemporaryDirectory() as out:
        settings = Settings(_env_file=None,  # type: ignore[call-arg]
                            redis_url=SecretStr(server.url))
        results = ResultStore(redis_client(settings), RedisKeys(), 3600)
        writer = ShardWriter(LocalOutputStore(Path(out).as_uri()), results, worker="budget",
                             lease_s=60)
        best = math.inf
        for repeat in range(repeats):
            batch = [OutputRow(Job(task=Task.ZERO_SHOT, image=f"/x/{repeat}-{i}.jpg", model="m",
                                   zero_shot=options, return_embedding=False),
                               np.ones(512, np.float32), "etag", labels, False)
                     for i in range(rows)]
            start = time.process_time()
            outcomes = writer.write(batch, "image")
            assert all(outcome.location for outcome in outcomes)
            best = min(best, time.process_time() - start)
    return 1000 * best / rows


def measure(model: str, paths: Sequence[Path], batch: int, cache: Path) -> dict[str, float]:
    import torch
    from torchvision.transforms import InterpolationMode, Resize

    from schemas.jobs import ZeroShotOptions
    from schemas.settings import Settings
    from worker.decode import decode_image
    from worker.models.loader import load_encoder
    from worker.prepare import ImagePreparer
    from worker.zeroshot import LabelEmbeddingCache, score

    torch.set_num_threads(1)
    encoder = load_encoder(model_spec(model, cache), device="cpu")
    count = len(paths)
    blobs = [path.read_bytes() for path in paths]
    images = [decode_image(blob) for blob in blobs]
    found = {
        "read_file": _cpu_ms(lambda: [p.read_bytes() for p in paths], count),
        "decode_image": _cpu_ms(lambda: [decode_image(b) for b in blobs], count),
        "preprocess": _cpu_ms(lambda: [encoder.preprocess_image(i) for i in images], count),
    }
    side = encoder.draft_side
    if side is not None:
        resize = Resize(side, interpolation=InterpolationMode.BICUBIC)
        found["preprocess.resize"] = _cpu_ms(lambda: [resize(i) for i in images], count)
    found["jpeg_draft: decode_image"] = _cpu_ms(
        lambda: [decode_image(b, draft_side=side) for b in blobs], count)
    found["jpeg_draft: decode_image + preprocess"] = _cpu_ms(
        lambda: [encoder.preprocess_image(decode_image(b, draft_side=side)) for b in blobs],
        count)
    torch_images = ImagePreparer(Settings(image_decoder="torch"), encoder, device_batches=False)
    found["image_decoder=torch: check + decode + preprocess"] = _cpu_ms(
        lambda: [torch_images.pixels(b) for b in blobs], count)
    pixels = torch.stack([encoder.preprocess_image(i) for i in images[:batch]])
    one = pixels[:1]
    encoder.encode_images(pixels)
    found["forward_batch1"] = _cpu_ms(lambda: encoder.encode_images(one), 1, passes=5)
    found[f"forward_batch{len(pixels)}_per_image"] = _cpu_ms(
        lambda: encoder.encode_images(pixels), len(pixels))
    embeds = encoder.encode_images(pixels)
    options = ZeroShotOptions(labels=LABELS, top_k=3)
    labels = LabelEmbeddingCache()
    score(encoder, embeds, options, labels)
    found["zero_shot_scoring"] = _cpu_ms(lambda: score(encoder, embeds, options, labels),
                                         len(pixels))
    found["write_shard_1_row"] = _write_cost(1, 20)
    found[f"write_shard_{batch}_rows_per_row"] = _write_cost(batch, 5)
    return {name: round(value, 3) for name, value in found.items()}


@click.command()
@click.option("--model", type=click.Choice(["tiny", "vit-b-16"]), default="tiny")
@click.option("--images", type=int, default=64)
@click.option("--batch", type=int, default=32)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("/tmp/dualstream-bench"))
@click.option("--model-cache", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CACHE)
def main(model: str, images: int, batch: int, workdir: Path, model_cache: Path) -> None:
    """CPU milliseconds per image, stage by stage, on one thread."""
    paths = make_corpus(workdir / f"images-{images}", images)
    click.echo(json.dumps(measure(model, paths, min(batch, images), model_cache), indent=2))


if __name__ == "__main__":
    main()
