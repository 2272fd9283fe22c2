"""How small a JPEG may be decoded for a model: the side its own preprocessing resizes to.

Scaled JPEG decoding (`decode_image(..., draft_side=)`) must never leave the model's resize
with less than it needs, or the model would see an upscaled picture. The size is read from the
reference preprocessing itself (transformers' image processor, open_clip's transform), so it
follows whatever the checkpoint configures.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torchvision.transforms import Resize


def processor_side(processor: Any) -> int | None:
    """The side a transformers image processor resizes to, or None when it cannot be told."""
    size = getattr(processor, "size", None)
    if size is None:
        return None
    read = size.get if isinstance(size, dict) else lambda name: getattr(size, name, None)
    shortest = read("shortest_edge")
    if shortest:
        return int(shortest)
    sides = [int(side) for side in (read("height"), read("width")) if side]
    return max(sides) if sides else None


def transform_side(transform: Any) -> int | None:
    """The size of the first `Resize` in a torchvision `Compose` (open_clip's transform)."""
    steps: Iterable[Any] = getattr(transform, "transforms", ())
    for step in steps:
        if isinstance(step, Resize):
            size = step.size
            return int(size) if isinstance(size, int) else max(int(s) for s in size)
    return None
