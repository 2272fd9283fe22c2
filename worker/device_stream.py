"""The staging stream: model input is made ready on the device on its own CUDA stream, so the
copy for batch n+1 overlaps the forward pass of batch n.

The staging thread decodes JPEGs on the device, stacks the rows, copies them from pinned memory
and casts them to the model's dtype and layout, all queued on the staging stream, then records
an event there. The model thread makes its own (current) stream wait for that event before it
forwards the batch, and tells the caching allocator that the batch is used on that stream too
(`record_stream`), so its memory is not handed out again while the forward may still read it.

On the CPU there are no streams: the same calls run in order and the hand-over is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from worker.models.device import host_to_device


@dataclass(frozen=True)
class StagedPixels:
    """A batch of model input on the device; `ready` is recorded once the copy is queued."""

    pixels: torch.Tensor
    ready: torch.cuda.Event | None = None


class DeviceStager:
    def __init__(self, device: torch.device, dtype: torch.dtype,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.device = device
        self._dtype = dtype
        self._memory_format = memory_format
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def on_stream(self) -> Iterator[None]:
        """Device work queued inside this block runs on the staging stream."""
        if self._stream is None:
            yield
            return
        with torch.cuda.stream(self._stream):
            yield

    def stage(self, batch: torch.Tensor) -> StagedPixels:
        """Copy, cast and lay out `batch` for the model on the staging stream (staging thread)."""
        with self.on_stream():
            pixels = host_to_device(batch, self.device, self._dtype, self._memory_format)
            if self._stream is None:
                return StagedPixels(pixels)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return StagedPixels(pixels, ready)

    def hand_over(self, staged: StagedPixels) -> torch.Tensor:
        """The staged batch, safe to use on the model thread's current stream."""
        if staged.ready is None:
            return staged.pixels
        current = torch.cuda.current_stream(self.device)
        current.wait_event(staged.ready)
        staged.pixels.record_stream(current)
        return staged.pixels
