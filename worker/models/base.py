"""The narrow interface the rest of the system calls.

Preprocessing (`preprocess_image`, `tokenize`) is separate from the forward pass
(`encode_images`, `encode_texts`) because the pipeline runs it on other threads than the model.
What else the worker needs to know of a family (how small a JPEG may be decoded, the tensor
form of its preprocessing, its logit scale and bias, its token limit) is asked of the encoder
too, never read from the library objects behind it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

# uint8 RGB [3, H, W] images on one device → float model input [N, 3, H, W] on that device.
TensorPreprocess = Callable[[Sequence[torch.Tensor]], torch.Tensor]


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

    @property
    def draft_side(self) -> int | None:
        """The shortest side a scaled JPEG decode must keep (the side `preprocess_image`
        resizes to), or None when it cannot be told."""
        ...

    @property
    def tensor_preprocess(self) -> TensorPreprocess | None:
        """What `preprocess_image` computes, on uint8 tensors for a whole batch; None when the
        family's preprocessing has no tensor form."""
        ...

    @property
    def logit_scale(self) -> float:
        """What cosine similarities are multiplied by to give `logits`."""
        ...

    @property
    def logit_bias(self) -> float | None:
        """The learned bias added to logits (sigmoid-trained models), or None."""
        ...

    @property
    def max_text_tokens(self) -> int:
        """Tokens a text may take, start and end tokens included; longer ones are truncated."""
        ...

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
