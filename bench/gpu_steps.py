"""The steps of `python -m bench.gpu`, each run in its own process so the deadline can stop it:

    python -m bench.gpu_steps STEP PARAMS.json OUT.json

- `device`: what torch sees (version, CUDA, the device's name, memory, capability).
- `parity`: fp16 and bf16 against fp32 on the device, per model: image and text embedding
  cosines, the largest zero-shot probability difference, and how often the top-1 label is the
  same (`bench.precision`'s comparison). Models: the three tiny families, and on a GPU the
  full-size architectures with random weights (`vit-b-16` from `bench.models`, `full-align`
  and `full-altclip` as `bench.model_latency` builds them).
- `throughput`: ViT-B/16 (or the tiny model) from JPEG bytes with `bench.run.run_model`: the
  ceiling (its batch-size sweep, and the bare forward pass at each batch size) and dualstream
  end to end (a real `dualstream worker` process and its own `redis-server`), per batch size.

Each step writes OUT.json after every part it finishes, so what was done survives a stop at the
deadline. `DUALSTREAM_GPU_SLOW=STEP:SECONDS` makes STEP sleep first (to test that guard).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

Params = dict[str, Any]
Save = Callable[[dict[str, Any]], None]


def device_step(params: Params, save: Save) -> None:
    import torch

    found: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                             "cuda_available": torch.cuda.is_available(),
                             "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                             "device": params["device"]}
    if params["device"].startswith("cuda"):
        index = torch.device(params["device"]).index or 0
        props = torch.cuda.get_device_properties(index)
        found.update(name=props.name, memory_gib=round(props.total_memory / 1024**3, 1),
                     capability=f"{props.major}.{props.minor}",
                     multiprocessors=props.multi_processor_count,
                     device_count=torch.cuda.device_count())
    save(found)


# --- parity ---------------------------------------------------------------------------------


def _full_transformers(name: str, scratch: Path) -> Any:
    """ALIGN-base or AltCLIP-sized with random weights, on the CPU in fp32 (ALIGN's BatchNorm
    calibrated, or every image embeds alike)."""
    import torch

    from bench.model_latency import _encoder
    from worker.models.tiny import _calibrate_batchnorm, _calibration_images

    family = name.removeprefix("full-")
    encoder = _encoder(family, "full", scratch / f"base-{family}")
    if family == "align":
        pixels = torch.stack([encoder.preprocess_image(im) for im in _calibration_images(8)])
        _calibrate_batchnorm(encoder.model.vision_model, pixels)
    return encoder


def _moved(encoder: Any, device: str, dtype: str) -> Any:
    """A copy of a transformers-family encoder on `device`, forwarding in `dtype`."""
    from worker.models.device import resolve_device, resolve_dtype

    clone = copy.copy(encoder)
    clone.device, clone.dtype = resolve_device(device), resolve_dtype(dtype)
    clone.model = copy.deepcopy(encoder.model).to(device=clone.device, dtype=clone.dtype)
    return clone


def _encoders(name: str, scratch: Path, device: str) -> Callable[[str], Any]:
    """dtype → the model `name` on `device` in that dtype, loaded as the worker loads it where
    it can be (tiny models, ViT-B/16 from its checkpoint)."""
    from bench.models import model_spec
    from worker.models.loader import load_encoder
    from worker.models.tiny import build_tiny_model

    if name.startswith(("tiny-", "vit-")):
        spec = (model_spec(name) if name == "vit-b-16"
                else build_tiny_model(name.removeprefix("tiny-"), scratch / name))
        return lambda dtype: load_encoder(spec, device=device, dtype=dtype)
    base = _full_transformers(name, scratch)
    return lambda dtype: _moved(base, device, dtype)


def parity_step(params: Params, save: Save) -> None:
    from bench.images import photo_like_jpegs
    from bench.precision import Variant, _compare, _outputs

    jpegs = photo_like_jpegs(params["images"])
    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in params["models"]:
            started = time.perf_counter()
            make = _encoders(name, Path(tmp), params["device"])
            reference = _outputs(make("fp32"), jpegs, Variant("fp32", {}))
            found[name] = {}
            for dtype in params["dtypes"]:
                other = _outputs(make(dtype), jpegs, Variant(dtype, {"dtype": dtype}))
                same_top1 = reference["probs"].argmax(-1) == other["probs"].argmax(-1)
                found[name][dtype] = {**_compare(reference, other),
                                      "top1_same": float(same_top1.float().mean())}
            found[name]["seconds"] = round(time.perf_counter() - started, 1)
            save(found)


# --- throughput -----------------------------------------------------------------------------


def _corpus_part(folder: str, count: int, seed: int) -> list[str]:
    from bench.images import make_corpus

    return [str(p) for p in make_corpus(Path(folder), count, seed=seed)]


def corpus(root: Path, distinct: int, parts: int) -> list[str]:
    """`distinct` JPEGs, made in `parts` processes (one takes ~0.14 s to make)."""
    each = -(-distinct // parts)
    with ProcessPoolExecutor(parts) as pool:
        made = pool.map(_corpus_part, [str(root / f"part{i:02d}") for i in range(parts)],
                        [each] * parts, range(parts))
        return [path for paths in made for path in paths][:distinct]


def throughput_step(params: Params, save: Save) -> None:
    """Per decoder: the ceiling and dualstream at the first batch size, then dualstream at
    the others; the bare forward pass at every batch size comes from the ceiling."""
    from bench.plan import DEFAULT_PLANS
    from bench.run import BenchOptions, run_model

    workdir = Path(params["workdir"])
    root = (workdir / "images").resolve()
    distinct = corpus(root, params["distinct"], params["corpus_processes"])
    sources = [distinct[i % len(distinct)] for i in range(params["images"])]
    batches = params["batches"]
    plan = replace(DEFAULT_PLANS[params["model"]], images=params["images"],
                   ceiling_batches=tuple(batches), **params["plan"])
    found: dict[str, Any] = {"distinct_jpegs": len(distinct), "jobs": len(sources), "runs": []}
    for decoder in params["decoders"]:
        forward_ms: dict[str, float] = {}
        for i, batch in enumerate(batches):
            options = BenchOptions(
                models=(params["model"],), modes=("ceiling", "dualstream") if i == 0
                else ("dualstream",), plans={}, workdir=workdir / f"{decoder}-{batch}",
                device=params["device"], dtype=params["dtype"],
                settings={"image_decoder": decoder, **params["settings"]})
            started = time.perf_counter()
            report = run_model(params["model"], replace(plan, max_batch_items=batch), root,
                               sources, options)
            forward_ms = report["modes"].get("ceiling", {}).get("forward_ms", forward_ms)
            found["runs"].append(_summary(decoder, batch, report, forward_ms,
                                          time.perf_counter() - started))
            save(found)


def _summary(decoder: str, batch: int, report: dict[str, Any], forward_ms: dict[str, float],
             seconds: float) -> dict[str, Any]:
    ceiling = report["summary"].get("ceiling", {})
    b = report["summary"]["dualstream"]
    bare_ms = forward_ms.get(str(batch))
    bare = batch * 1000 / bare_ms if bare_ms else None
    return {"decoder": decoder, "batch": batch, "seconds": round(seconds, 1),
            "ceiling_items_per_s": ceiling.get("items_per_s"),
            "ceiling_best_batch": report["modes"].get("ceiling", {}).get("batch_size"),
            "ceiling_sweep_items_per_s": report["modes"].get("ceiling", {}).get(
                "sweep_items_per_s"),
            "dualstream_items_per_s": b["items_per_s"], "failed": b["failed"],
            "bare_forward_items_per_s": bare,
            "b_over_bare_forward": b["items_per_s"] / bare if bare else None,
            "dualstream_p50_ms": b["latency_p50_ms"], "batch_fill": b["batch_fill"],
            "worker_cpu_ms_per_item": b["worker_cpu_ms_per_item"],
            "report": report}


STEPS: dict[str, Callable[[Params, Save], None]] = {
    "device": device_step,
    "parity": parity_step,
    "throughput": throughput_step,
}


def _slow(step: str) -> None:
    """`DUALSTREAM_GPU_SLOW=STEP:SECONDS`: a simulated slow step, for the deadline's test."""
    name, _, seconds = os.environ.get("DUALSTREAM_GPU_SLOW", "").partition(":")
    if name == step and seconds:
        time.sleep(float(seconds))


def main(argv: list[str]) -> int:
    step, params_path, out_path = argv
    params = json.loads(Path(params_path).read_text())
    out = Path(out_path)

    def save(found: dict[str, Any]) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(found, default=str))
        tmp.replace(out)

    _slow(step)
    STEPS[step](params, save)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
