"""The narrow interface the rest of the system calls.

Preprocessing (`preprocess_image`, `tokenize`) is separate from the forward pass
(`encode_images`, `encode_texts`) because the pipeline runs it on other threads than the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from PIL import Image


@dataclass(frozen=True)
class TokenizedTexts:
    """Model-ready text tensors (batch first) and, per text, whether it was cut to fit."""

    tensors: Mapping[str, torch.Tensor]
    truncated: list[bool]

    def __len__(self) -> int:
        return len(self.truncated)


@runtime_checkable
class Encoder(Protocol):
    family: str
    model_id: str
    embed_dim: int
    device: torch.device
    dtype: torch.dtype

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """One decoded RGB image → a float32 CPU tensor [3, H, W]. Thread-safe."""
        ...

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        """Texts → padded token tensors on the CPU; over-long texts are truncated. Thread-safe."""
        ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] → [N, D] L2-normalised float32 embeddings on the CPU."""
        ...

    def encode_texts(self, texts: TokenizedTexts) -> torch.Tensor:
        """Tokenized texts → [N, D] L2-normalised float32 embeddings on the CPU."""
        ...

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings → [N_images, N_texts] logits with the family's own scale."""
        ...
