"""A model's image preprocessing on uint8 tensors, on the model's device, for a whole batch.

Each family gives a function `list[uint8 RGB CHW tensors] → float [N, 3, H, W]` on the
tensors' device (`Encoder.tensor_preprocess`) that computes what its own `preprocess_image`
computes from the same pixels as a PIL image:

- ALIGN and AltCLIP (`processor_on_tensors`): the checkpoint's transformers image processor
  itself, which with its default (torchvision) backend takes tensors and a `device=` and turns
  a PIL image into exactly such a tensor before resizing, so both inputs give the same numbers.
- OpenCLIP (`openclip.transform_on_tensors`): open_clip's inference transform replayed step by
  step with torchvision's v2 functional ops.
- Anything else (another transform, a processor with the PIL backend) has none; the decoder
  then turns each tensor back into a PIL image for `preprocess_image` (`through_pil`). Exact,
  but on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torchvision.transforms.v2 import functional as F

from worker.models.base import Encoder, TensorPreprocess

log = logging.getLogger(__name__)


def processor_on_tensors(processor: Any) -> TensorPreprocess | None:
    """A transformers image processor's tensor form: itself, with the torchvision backend."""
    if getattr(processor, "backend", None) != "torchvision":
        return None
    return partial(_with_processor, processor)


def through_pil(encoder: Encoder) -> TensorPreprocess:
    """`encoder.preprocess_image` on each tensor turned back into a PIL image, on the CPU."""
    log.warning("%s: no tensor form of its preprocessing; tensors go through PIL on the CPU",
                encoder.model_id)
    return partial(_via_pil, encoder)


def _with_processor(processor: Any, images: Sequence[torch.Tensor]) -> torch.Tensor:
    device = images[0].device
    out = processor(images=list(images), return_tensors="pt", device=device)["pixel_values"]
    return out.to(device)


def _via_pil(encoder: Encoder, images: Sequence[torch.Tensor]) -> torch.Tensor:
    device = images[0].device
    rows = [encoder.preprocess_image(F.to_pil_image(image.cpu())) for image in images]
    return torch.stack(rows).to(device)
