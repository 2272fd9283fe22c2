"""What ALIGN and AltCLIP share: preprocessing with the checkpoint's image processor (and its
tensor form and resize side), tokenizing with truncation flags in one pass
(`worker/models/tokens.py`), and projected features from transformers'
`get_*_features(...).pooler_output`, normalised on the CPU."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from worker.models.base import TensorPreprocess, TokenizedTexts
from worker.models.device import host_to_device, normalised_cpu
from worker.models.draft_size import processor_side
from worker.models.tensor_preprocess import processor_on_tensors
from worker.models.tokens import hf_tokens
from worker.models.vision import VisionOptions


class TransformersFeatures:
    """Mixin: a subclass sets `max_text_tokens` and `text_padding` (its reference padding)."""

    max_text_tokens: int
    text_padding: bool | str
    logit_bias: float | None = None  # neither family learns one
    model: Any
    image_processor: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    vision: VisionOptions
    # The fast tokenizer's truncation/padding settings are shared, mutable state.
    _tokenizer_lock: threading.Lock

    @property
    def draft_side(self) -> int | None:
        return processor_side(self.image_processor)

    @property
    def tensor_preprocess(self) -> TensorPreprocess | None:
        return processor_on_tensors(self.image_processor)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"][0]

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        with self._tokenizer_lock:
            tensors, truncated = hf_tokens(self.tokenizer, texts, padding=self.text_padding,
                                           max_length=self.max_text_tokens)
        return TokenizedTexts(tensors=tensors, truncated=truncated)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        batch = host_to_device(pixels, self.device, self.dtype, self.vision.memory_format)
        with torch.inference_mode():
            out = self.model.get_image_features(pixel_values=batch)
        return normalised_cpu(out.pooler_output)

    def encode_texts(self, texts: TokenizedTexts) -> torch.Tensor:
        inputs = {name: t.to(self.device) for name, t in texts.tensors.items()}
        with torch.inference_mode():
            out = self.model.get_text_features(**inputs)
        return normalised_cpu(out.pooler_output)
