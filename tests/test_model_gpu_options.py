"""The host→device copy helper. On the CPU only: the CUDA path (pinned memory, non-blocking
copies) cannot run here.
"""

from __future__ import annotations

import torch

from worker.models.device import host_to_device

# --- host → device ------------------------------------------------------------------------


def test_host_to_device_on_cpu_returns_an_fp32_batch_uncopied() -> None:
    batch = torch.rand(2, 3, 8, 8)
    assert host_to_device(batch, torch.device("cpu"), torch.float32) is batch


def test_host_to_device_on_cpu_casts_and_changes_layout_keeping_values() -> None:
    batch = torch.rand(2, 3, 8, 8)
    moved = host_to_device(batch, torch.device("cpu"), torch.bfloat16, torch.channels_last)
    assert moved.dtype == torch.bfloat16 and moved.device.type == "cpu"
    assert moved.is_contiguous(memory_format=torch.channels_last) and not moved.is_contiguous()
    assert torch.equal(moved, batch.to(torch.bfloat16))
