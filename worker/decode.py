"""Bytes → a safe RGB image, or a typed error.

Only an allow-list of formats is opened; size is checked from the header before pixels are
decoded, so a decompression bomb never allocates its full frame.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from schemas.errors import ErrorCode, ImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 20_000


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    if not data:
        raise ImageError("the image is empty (0 bytes)", code=ErrorCode.EMPTY_SOURCE)
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"{len(data)} bytes exceeds the limit of {limits.max_bytes}",
            code=ErrorCode.SOURCE_TOO_LARGE,
        )
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})",
            code=ErrorCode.UNSUPPORTED_FORMAT,
        ) from exc
    width, height = image.size
    if width * height > limits.max_pixels or max(width, height) > limits.max_side:
        raise ImageError(
            f"{width}x{height} exceeds the limit of {limits.max_pixels} pixels",
            code=ErrorCode.IMAGE_TOO_LARGE,
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"the image could not be decoded: {exc}") from exc
