"""Optional speed-ups of the vision tower: channels-last memory format and `torch.compile`.

Both are off by default. Neither changes the weights or the maths: channels-last changes how
convolution inputs and weights lie in memory (faster convolutions on GPUs with tensor cores,
and for EfficientNet on the CPU), and compilation fuses the tower's operations. Embeddings
agree with the default path to float rounding.

Only the image tower is compiled: it does nearly all of an image job's work, and its input
shape is fixed but for the batch size. `warm_up` compiles it at start-up, for a batch of one
and then for any larger batch, so no job pays for compilation: on a GPU that takes long
enough to trip the worker's stall check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from worker.models.base import Encoder


@dataclass(frozen=True)
class VisionOptions:
    channels_last: bool = False
    compile: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout image batches are given in, matching the tower's weights."""
        return torch.channels_last if self.channels_last else torch.contiguous_format


DEFAULT_VISION = VisionOptions()
# torch's default compiler; tests put a cheap one in its place.
COMPILE_BACKEND: str | Callable[..., Any] = "inductor"


def prepare_vision_tower(tower: torch.nn.Module, options: VisionOptions) -> None:
    """Apply `options` to the tower in place; compilation itself happens on the first call."""
    if options.channels_last:
        tower.to(memory_format=torch.channels_last)
    if options.compile:
        tower.compile(backend=COMPILE_BACKEND)


def warm_up(encoder: Encoder) -> None:
    """Compile the image path now: a batch of one, then two.

    The second batch size makes the compiler treat the batch dimension as dynamic, so every
    later size reuses that graph; one is specialised apart, hence its own warm-up.
    """
    blank = encoder.preprocess_image(Image.new("RGB", (256, 256)))
    for size in (1, 2):
        encoder.encode_images(blank.expand(size, *blank.shape).contiguous())
