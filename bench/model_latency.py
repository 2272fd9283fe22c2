"""CPU latency of each family's encoder, tiny and full-size, at batch 1 and batch 16.

Full-size models are the reference architectures with random weights (no weights can be
downloaded here): ALIGN-base (`AlignConfig()` defaults: EfficientNet-B7 at 289 px, BERT-base),
open_clip ViT-B-16, and AltCLIP at BAAI/AltCLIP's sizes (ViT-L/14 image tower, XLM-R large
text tower; transformers' default `AltCLIPConfig` has a ViT-B/32 image tower, so the vision
sizes are set here). Random weights cost the same time as trained ones. Each full-size model
is wrapped in the same encoder class the worker uses, with the tiny model's processor and
tokenizer (same preprocessing settings; token ids fit every vocabulary), so the timed code is
the worker's code.

Timed: `encode_images` on preprocessed pixels, `encode_texts` on tokenized prompts (the
forward passes), and `preprocess_image` per image, `--repeats` runs after one warm-up. The table
shows the best run (least disturbed by other processes on a shared machine); the JSON also has
the median, and the 1-minute load average after each model, to judge how quiet the CPUs were.

    python -m bench.model_latency [--families align openclip altclip] [--sizes tiny full]
                                  [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

FAMILIES = ("align", "openclip", "altclip")
BATCHES = (1, 16)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            for size in args.sizes:
                started = time.perf_counter()
                encoder = _encoder(family, size, Path(tmp))
                build_s = time.perf_counter() - started
                rows.append(_measure(encoder, family, size, build_s, args.repeats))
                rows[-1]["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
                print(_row(rows[-1]), file=sys.stderr, flush=True)
                del encoder
    report = {
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "note": "load_avg_1m_after above the CPU count means other processes shared the CPUs",
        "rows": rows,
    }
    print(_table(rows))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the JSON report to this file")
    return parser.parse_args(argv)


# --- encoders ------------------------------------------------------------------------------


def _encoder(family: str, size: str, tmp: Path) -> Any:
    from worker.models.loader import load_encoder
    from worker.models.tiny import build_tiny_model

    spec = build_tiny_model(family, tmp / family)
    tiny = load_encoder(spec, device="cpu")
    if size == "tiny":
        return tiny
    return _FULL[family](tiny)


def _full_align(tiny: Any) -> Any:
    from transformers import AlignConfig, AlignModel, AlignProcessor

    from worker.models.align import AlignEncoder

    model = AlignModel(AlignConfig())  # ALIGN has no SDPA path: eager attention
    processor = AlignProcessor(image_processor=tiny.image_processor, tokenizer=tiny.tokenizer)
    return AlignEncoder("full:align-base", model, processor, tiny.device, tiny.dtype)


def _full_openclip(tiny: Any) -> Any:
    import open_clip

    from worker.models.openclip import OpenClipEncoder

    model, _, transform = open_clip.create_model_and_transforms("ViT-B-16")
    return OpenClipEncoder(
        "full:ViT-B-16", model, transform, tiny.tokenizer, 512, tiny.device, tiny.dtype
    )


def _full_altclip(tiny: Any) -> Any:
    from transformers import AltCLIPConfig, AltCLIPModel, AltCLIPProcessor

    from worker.models.altclip import AltClipEncoder

    vision = {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "patch_size": 14, "image_size": 224, "projection_dim": 768,
    }
    model = AltCLIPModel(AltCLIPConfig(vision_config=vision, projection_dim=768))
    processor = AltCLIPProcessor(image_processor=tiny.image_processor, tokenizer=tiny.tokenizer)
    return AltClipEncoder("full:BAAI/AltCLIP-sized", model, processor, tiny.device, tiny.dtype)


_FULL: dict[str, Callable[[Any], Any]] = {
    "align": _full_align,
    "openclip": _full_openclip,
    "altclip": _full_altclip,
}


# --- measuring -----------------------------------------------------------------------------


def _measure(encoder: Any, family: str, size: str, build_s: float, repeats: int) -> dict:
    images = _images(max(BATCHES))
    prompts = [f"This is a photo of a {w}." for w in ("cat", "dog", "red car", "tree") * 4]
    per_image, _ = _best_and_median(partial(encoder.preprocess_image, images[0]), repeats + 2)
    pixels = torch.stack([encoder.preprocess_image(im) for im in images])
    row: dict[str, Any] = {
        "family": family,
        "size": size,
        "params_m": round(sum(p.numel() for p in _module(encoder).parameters()) / 1e6, 3),
        "build_s": round(build_s, 2),
        "preprocess_ms_per_image": round(per_image * 1e3, 2),
    }
    for batch in BATCHES:
        tokens = encoder.tokenize(prompts[:batch])
        for kind, call in (
            ("image", partial(encoder.encode_images, pixels[:batch])),
            ("text", partial(encoder.encode_texts, tokens)),
        ):
            best, median = _best_and_median(call, repeats)
            row[f"{kind}_b{batch}_ms"] = round(best * 1e3, 1)
            row[f"{kind}_b{batch}_median_ms"] = round(median * 1e3, 1)
    return row


def _best_and_median(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times), statistics.median(times)


def _module(encoder: Any) -> torch.nn.Module:
    return encoder.model


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        pixels = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG")
        images.append(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return images


COLUMNS = (
    "family", "size", "params_m", "preprocess_ms_per_image",
    "image_b1_ms", "image_b16_ms", "text_b1_ms", "text_b16_ms", "load_avg_1m_after",
)


def _row(row: dict) -> str:
    return " | ".join(str(row[c]) for c in COLUMNS)


def _table(rows: list[dict]) -> str:
    header = " | ".join(COLUMNS)
    lines = [header, " | ".join("---" for _ in COLUMNS), *(_row(r) for r in rows)]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
