"""A model's image preprocessing on uint8 tensors, on the model's device, for a whole batch.

`tensor_preprocess(encoder)` gives a function `list[uint8 RGB CHW tensors] → float [N, 3, H, W]`
on the tensors' device that computes what the encoder's own `preprocess_image` computes from
the same pixels as a PIL image:

- ALIGN and AltCLIP: the checkpoint's transformers image processor itself, which with its
  default (torchvision) backend takes tensors and a `device=` and turns a PIL image into
  exactly such a tensor before resizing, so both inputs give the same numbers.
- OpenCLIP: open_clip's inference transform (`Resize` shortest side, `CenterCrop`, RGB,
  `ToTensor`, `Normalize`) replayed step by step with torchvision's v2 functional ops, with
  each step's own parameters. Resizing a tensor is not Pillow's resize: torchvision's
  antialiased bicubic is built to follow Pillow's, and lands within a grey level of it.
- Anything else (another transform, a processor with the PIL backend): each tensor is turned
  back into a PIL image and given to `preprocess_image`. Exact, but on the CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from open_clip.transform import MaybeConvertMode
from torchvision.transforms import CenterCrop, Normalize, Resize, ToTensor
from torchvision.transforms.v2 import functional as F

from worker.models.base import Encoder

log = logging.getLogger(__name__)

TensorPreprocess = Callable[[Sequence[torch.Tensor]], torch.Tensor]
_ImageStep = Callable[[torch.Tensor], torch.Tensor]


def tensor_preprocess(encoder: Encoder) -> TensorPreprocess:
    """The batched tensor equivalent of `encoder.preprocess_image`."""
    processor = getattr(encoder, "image_processor", None)
    if processor is not None and getattr(processor, "backend", None) == "torchvision":
        return partial(_with_processor, processor)
    steps = _openclip_steps(getattr(encoder, "transform", None))
    if steps is not None:
        return partial(_with_steps, *steps)
    log.warning("%s: no tensor form of its preprocessing; tensors go through PIL on the CPU",
                encoder.model_id)
    return partial(_via_pil, encoder)


def _with_processor(processor: Any, images: Sequence[torch.Tensor]) -> torch.Tensor:
    device = images[0].device
    out = processor(images=list(images), return_tensors="pt", device=device)["pixel_values"]
    return out.to(device)


def _with_steps(per_image: list[_ImageStep], per_batch: list[_ImageStep],
                images: Sequence[torch.Tensor]) -> torch.Tensor:
    resized = []
    for image in images:
        for step in per_image:
            image = step(image)
        resized.append(image)
    batch = torch.stack(resized)
    for step in per_batch:
        batch = step(batch)
    return batch


def _via_pil(encoder: Encoder, images: Sequence[torch.Tensor]) -> torch.Tensor:
    device = images[0].device
    rows = [encoder.preprocess_image(F.to_pil_image(image.cpu())) for image in images]
    return torch.stack(rows).to(device)


def _openclip_steps(transform: Any) -> tuple[list[_ImageStep], list[_ImageStep]] | None:
    """open_clip's Compose as (per-image uint8 steps, batched float steps), or None if any step
    has no exact tensor form here."""
    per_image: list[_ImageStep] = []
    per_batch: list[_ImageStep] = []
    for step in getattr(transform, "transforms", None) or [None]:
        if isinstance(step, Resize) and not per_batch:
            per_image.append(partial(F.resize, size=step.size, interpolation=step.interpolation,
                                     max_size=step.max_size, antialias=step.antialias))
        elif isinstance(step, CenterCrop) and not per_batch:
            per_image.append(partial(F.center_crop, output_size=list(step.size)))
        elif isinstance(step, MaybeConvertMode) and step.mode == "RGB":
            continue  # the decoder already gives RGB
        elif isinstance(step, ToTensor) and not per_batch:  # open_clip's MaybeToTensor too
            per_batch.append(partial(F.to_dtype, dtype=torch.float32, scale=True))
        elif isinstance(step, Normalize) and per_batch:
            per_batch.append(partial(F.normalize, mean=list(step.mean), std=list(step.std),
                                     inplace=step.inplace))
        else:
            return None
    return per_image, per_batch
