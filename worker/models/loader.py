"""`load_encoder(spec)`: the one way the rest of the system gets a model.

The spec is parsed (see `spec.py`), then handed to its family's factory through an explicit
mapping. Each factory imports its own library when called, so loading an ALIGN model never
imports open_clip and vice versa. Whatever goes wrong while loading (a missing file, a config
the library rejects) becomes a `ModelSpecError`: the job names a model we cannot serve, and
retrying will not change that. Running out of GPU memory is not a spec problem and is re-raised.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from schemas.errors import ModelSpecError
from worker.models.base import Encoder
from worker.models.device import resolve_device, resolve_dtype
from worker.models.spec import Family, ModelSpec, parse_spec
from worker.models.vision import VisionOptions, warm_up

Factory = Callable[[ModelSpec, torch.device, torch.dtype, VisionOptions], Encoder]


def _align(
    spec: ModelSpec, device: torch.device, dtype: torch.dtype, vision: VisionOptions
) -> Encoder:
    from worker.models.align import AlignEncoder

    return AlignEncoder.load(spec, device, dtype, vision)


def _openclip(
    spec: ModelSpec, device: torch.device, dtype: torch.dtype, vision: VisionOptions
) -> Encoder:
    from worker.models.openclip import OpenClipEncoder

    return OpenClipEncoder.load(spec, device, dtype, vision)


def _altclip(
    spec: ModelSpec, device: torch.device, dtype: torch.dtype, vision: VisionOptions
) -> Encoder:
    from worker.models.altclip import AltClipEncoder

    return AltClipEncoder.load(spec, device, dtype, vision)


FACTORIES: dict[Family, Factory] = {
    "align": _align,
    "openclip": _openclip,
    "altclip": _altclip,
}


def load_encoder(
    spec: str,
    *,
    family: str | None = None,
    device: str = "auto",
    dtype: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
) -> Encoder:
    """Load the model `spec` names, on `device` (auto/cpu/cuda), forwarding in `dtype`.

    `channels_last` and `compile` apply to the vision tower (see `vision.py`). A compiled
    tower is compiled here, before the first job; a compiler failure is raised as it is,
    not as a spec error: the model is fine, the machine cannot compile it.
    """
    parsed = parse_spec(spec, family=family)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    vision = VisionOptions(channels_last=channels_last, compile=compile)
    try:
        encoder = FACTORIES[parsed.family](parsed, torch_device, torch_dtype, vision)
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelSpecError(
            f"cannot load model {spec!r} as {parsed.family} from {parsed.source!r}: {exc}"
        ) from exc
    if compile:
        warm_up(encoder)
    return encoder

