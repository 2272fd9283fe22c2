"""The benchmark's inputs: deterministic, photo-like JPEGs from 640×480 to 1024×768.

Flat colours or pure noise would make JPEG decoding unrealistically cheap or expensive; these
are smooth random fields (low-frequency structure, like a photo's large shapes) with a few
hard-edged shapes and mild sensor-like noise, saved at quality 90, which gives file sizes in
the range of camera photos downscaled for the web (roughly 60-250 KB).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy and Pillow load when images are made, not with the CLI
    import numpy as np
    from PIL import Image

SIZES = ((640, 480), (800, 600), (1024, 768), (960, 720), (720, 540))
QUALITY = 90
_STAMP = "corpus.json"


def photo_like(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    width, height = size
    coarse = rng.integers(0, 256, (height // 48 + 2, width // 48 + 2, 3), dtype=np.uint8)
    field = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=colour)
    field = field.filter(ImageFilter.GaussianBlur(1.2))
    noise = rng.normal(0, 6, (height, width, 3))
    pixels = np.clip(np.asarray(field, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


Size = tuple[int, int]


def make_corpus(folder: Path, count: int, seed: int = 5,
                sizes: tuple[Size, ...] = SIZES) -> list[Path]:
    """`count` JPEGs in `folder`, cycling through `sizes` (reused when already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / _STAMP
    wanted = {"count": count, "seed": seed, "quality": QUALITY, "sizes": sizes}
    paths = [folder / f"img{i:05d}.jpg" for i in range(count)]
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(wanted)) \
            and all(p.is_file() for p in paths):
        return paths
    import numpy as np

    rng = np.random.default_rng(seed)
    for i, path in enumerate(paths):
        photo_like(rng, sizes[i % len(sizes)]).save(path, format="JPEG", quality=QUALITY)
    stamp.write_text(json.dumps(wanted))
    return paths


def corpus_summary(paths: list[Path], sizes: tuple[Size, ...] = SIZES) -> dict[str, object]:
    lengths = [p.stat().st_size for p in paths]
    return {"count": len(paths), "dimensions": [f"{w}x{h}" for w, h in sizes],
            "mean_kib": round(sum(lengths) / len(lengths) / 1024, 1),
            "min_kib": round(min(lengths) / 1024, 1), "max_kib": round(max(lengths) / 1024, 1),
            "jpeg_quality": QUALITY}


def parse_sizes(text: str) -> tuple[Size, ...]:
    """`640x480,800x600` → ((640, 480), (800, 600))."""
    sizes = []
    for part in text.split(","):
        width, _, height = part.strip().lower().partition("x")
        sizes.append((int(width), int(height)))
    return tuple(sizes)


def photo_like_jpegs(count: int = 10, seed: int = 7) -> list[bytes]:
    """Smooth fields with shapes and mild noise (the benchmark's inputs), 640×480 to 1024×768."""
    import io

    import numpy as np

    rng = np.random.default_rng(seed)
    jpegs = []
    for i in range(count):
        buffer = io.BytesIO()
        photo_like(rng, SIZES[i % len(SIZES)]).save(buffer, format="JPEG", quality=QUALITY)
        jpegs.append(buffer.getvalue())
    return jpegs
