"""Test images: distinct, realistic-size JPEGs, so a collapsed model would be caught."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg_bytes(seed: int, size: tuple[int, int] = (640, 480)) -> bytes:
    rng = np.random.default_rng(seed)
    width, height = size
    base = rng.integers(0, 256, size=3)
    y, x = np.mgrid[0:height, 0:width]
    pattern = np.stack([(x * (seed % 7 + 1) + base[0]) % 256,
                        (y * (seed % 5 + 1) + base[1]) % 256,
                        ((x + y) * (seed % 3 + 1) + base[2]) % 256], axis=-1)
    noise = rng.integers(0, 40, size=pattern.shape)
    image = Image.fromarray(np.clip(pattern + noise, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def photo_like_jpegs(count: int = 10, seed: int = 7) -> list[bytes]:
    """Smooth fields with shapes and mild noise (the benchmark's inputs), 640×480 to 1024×768."""
    from bench.images import QUALITY, SIZES, photo_like

    rng = np.random.default_rng(seed)
    jpegs = []
    for i in range(count):
        buffer = io.BytesIO()
        photo_like(rng, SIZES[i % len(SIZES)]).save(buffer, format="JPEG", quality=QUALITY)
        jpegs.append(buffer.getvalue())
    return jpegs
