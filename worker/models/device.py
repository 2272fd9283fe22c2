"""Device and dtype choices, shared by the three family encoders.

An encoder forwards in the dtype it was asked for, on the device it was asked for, and always
hands back float32, L2-normalised embeddings on the CPU: callers (scoring, output writers) never
see half precision or GPU tensors, and two encoders of the same model agree on what they return.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from schemas.errors import ModelSpecError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """`auto` picks the GPU when there is one; asking for `cuda` without one is an error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ModelSpecError(f"unknown device {name!r}: use one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSpecError(f"device {name!r} was asked for, but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelSpecError(
            f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}"
        ) from None


def normalised_cpu(features: torch.Tensor) -> torch.Tensor:
    """Any-dtype features on any device → float32, unit-length rows, on the CPU."""
    return F.normalize(features.float(), dim=-1).cpu()


def host_to_device(
    batch: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """An image batch → `device`, then `dtype` and `memory_format` there.

    From the CPU to a GPU the batch is copied from pinned memory without blocking the host
    thread, and the cast and layout change run on the GPU rather than the CPU. On the CPU
    nothing is copied that need not be: a float32, contiguous batch comes back as the same
    tensor, and so does one already on the device in the right dtype and layout.
    """
    if batch.device.type == "cpu" and device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device=device, dtype=dtype, memory_format=memory_format)
