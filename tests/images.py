"""Test images: distinct, realistic-size JPEGs, so a collapsed model would be caught."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from bench.images import photo_like_jpegs

__all__ = ["jpeg_bytes", "photo_like_jpegs"]


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

