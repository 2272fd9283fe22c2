"""What each model's run uses: image counts, batch sizes, threads and worker settings.

The defaults are the settings that gave the best dualstream throughput on the 2-core
benchmark machine (see BENCHMARKS.md, "Tuning"); the ceiling sweeps its batch size itself, and
the naive baseline gets its best pool. Any field can be overridden from the command line with
`--set MODEL.FIELD=VALUE` (e.g. `--set tiny.max_batch_items=64`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelPlan:
    images: int
    texts: int  # items of a run in text mode (`--modality text`), in place of `images`
    latency_jobs: int
    warmup_jobs: int
    repeats: int  # throughput runs per mode; the best is reported (the machine may be shared)
    # a. ceiling
    ceiling_batches: tuple[int, ...]
    ceiling_sweep_items: int
    ceiling_prepare_threads: int
    ceiling_torch_threads: int
    ceiling_latency_items: int
    # b. dualstream worker
    torch_threads: int
    max_batch_items: int
    max_batch_wait_ms: int
    max_inflight_messages: int
    per_message: int
    fetch_threads: int
    preprocess_threads: int
    # c. naive worker
    naive_pool: str
    naive_concurrency: int
    naive_torch_threads: int
    # b's worker processes on one queue (`dualstream worker --processes`), torch_threads each
    worker_processes: int = 1
    extra_worker_settings: dict[str, str] = field(default_factory=dict)

    def items(self, modality: str) -> int:
        """Items of one throughput run: images, or texts in text mode."""
        return self.texts if modality == "text" else self.images

    def worker_settings(self) -> dict[str, object]:
        return {"max_batch_items": self.max_batch_items,
                "max_batch_wait_ms": self.max_batch_wait_ms,
                "max_inflight_messages": self.max_inflight_messages,
                "fetch_threads": self.fetch_threads,
                "preprocess_threads": self.preprocess_threads,
                "worker_processes": self.worker_processes,
                **self.extra_worker_settings}


DEFAULT_PLANS: dict[str, ModelPlan] = {
    # Decode + resize (~8 ms of CPU an image) dominate; the forward pass is ~0.5 ms an image.
    # Batches of up to 64 with up to 100 ms to fill them cut the per-batch overhead (forward
    # call, shard, claims, results) that small batches pay; at light load a lone job is not
    # held back (the pipeline flushes as soon as nothing more is being prepared).
    "tiny": ModelPlan(
        images=512, texts=4096, latency_jobs=40, warmup_jobs=16, repeats=4,
        ceiling_batches=(16, 32, 64), ceiling_sweep_items=256, ceiling_prepare_threads=2,
        ceiling_torch_threads=1, ceiling_latency_items=20,
        torch_threads=1, max_batch_items=64, max_batch_wait_ms=100, max_inflight_messages=8,
        per_message=32, fetch_threads=4, preprocess_threads=2,
        naive_pool="threads", naive_concurrency=2, naive_torch_threads=1,
    ),
    # The forward pass (~240 ms an image on both cores) dominates; on a CPU its cost per image
    # hardly falls with the batch size, so batches stay small and torch gets both cores.
    "vit-b-16": ModelPlan(
        images=48, texts=256, latency_jobs=8, warmup_jobs=8, repeats=2,
        ceiling_batches=(4, 8, 16), ceiling_sweep_items=16, ceiling_prepare_threads=1,
        ceiling_torch_threads=2, ceiling_latency_items=4,
        torch_threads=2, max_batch_items=8, max_batch_wait_ms=50, max_inflight_messages=4,
        per_message=8, fetch_threads=4, preprocess_threads=1,
        naive_pool="threads", naive_concurrency=2, naive_torch_threads=2,
    ),
}


def _convert(current: object, raw: str) -> object:
    if isinstance(current, bool):
        return raw.lower() in ("1", "true", "yes")
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, tuple):
        return tuple(int(x) for x in raw.split(",") if x)
    return raw


def apply_overrides(plans: dict[str, ModelPlan], overrides: list[str]) -> dict[str, ModelPlan]:
    """`MODEL.FIELD=VALUE` overrides; `MODEL.worker.NAME=VALUE` adds a DUALSTREAM_ setting."""
    plans = dict(plans)
    for override in overrides:
        target, _, raw = override.partition("=")
        model, _, name = target.partition(".")
        if model not in plans or not name or not raw:
            raise ValueError(f"bad override {override!r}: use MODEL.FIELD=VALUE, MODEL one of "
                             f"{', '.join(plans)}")
        plan = plans[model]
        if name.startswith("worker."):
            extra = {**plan.extra_worker_settings, name.removeprefix("worker."): raw}
            plans[model] = dataclasses.replace(plan, extra_worker_settings=extra)
            continue
        if name not in {f.name for f in dataclasses.fields(plan)}:
            raise ValueError(f"bad override {override!r}: no field {name!r}")
        changes: dict[str, Any] = {name: _convert(getattr(plan, name), raw)}
        plans[model] = dataclasses.replace(plan, **changes)
    return plans
