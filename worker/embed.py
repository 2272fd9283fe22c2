"""Embed a handful of images or texts with one call: for users, scripts and tests.

The worker's pipeline calls the encoder's stages itself (preprocessing on other threads, one
forward per micro-batch); these helpers run the same stages in line, so their output is what
the pipeline produces for the same inputs. Image bytes go through `decode_image`, with its
format allow-list and pixel limits, exactly as in the worker.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from schemas.errors import ErrorCode, TextError
from worker.decode import ImageLimits, decode_image
from worker.models.base import Encoder


def embed_images(
    encoder: Encoder,
    images: Sequence[Image.Image | bytes],
    *,
    limits: ImageLimits | None = None,
) -> torch.Tensor:
    """Images (decoded, or encoded bytes) → [N, D] float32 L2-normalised embeddings.

    Raises `ImageError` (with the decoder's code) for bytes that are not an acceptable image.
    """
    if not images:
        return torch.empty(0, encoder.embed_dim)
    decoded = [_as_image(image, limits or ImageLimits()) for image in images]
    pixels = torch.stack([encoder.preprocess_image(image) for image in decoded])
    return encoder.encode_images(pixels)


def embed_texts(encoder: Encoder, texts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
    """Texts → ([N, D] embeddings, per text whether it was truncated to fit the model).

    Raises `TextError` (code `EMPTY_TEXT`) for an empty or blank text: an embedding of nothing
    is meaningless, and a tokenizer would silently return one anyway.
    """
    blank = [i for i, text in enumerate(texts) if not text.strip()]
    if blank:
        raise TextError(f"texts at positions {blank} are empty or blank", code=ErrorCode.EMPTY_TEXT)
    if not texts:
        return torch.empty(0, encoder.embed_dim), []
    tokens = encoder.tokenize(texts)
    return encoder.encode_texts(tokens), list(tokens.truncated)


def _as_image(image: Image.Image | bytes, limits: ImageLimits) -> Image.Image:
    if isinstance(image, bytes | bytearray | memoryview):
        return decode_image(bytes(image), limits)
    return image if image.mode == "RGB" else image.convert("RGB")
