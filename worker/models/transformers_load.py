"""`from_pretrained` for the transformers families (ALIGN, AltCLIP), refusing bad checkpoints."""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from transformers import AutoConfig

from schemas.errors import ModelSpecError
from worker.models.spec import ModelSpec

ModelT = TypeVar("ModelT")


def load_transformers_model(
    model_class: type[ModelT],
    spec: ModelSpec,
    model_type: str,
    device: torch.device,
    dtype: torch.dtype,
    **kwargs: Any,
) -> ModelT:
    """`from_pretrained` onto `device`, refusing what transformers would only log about.

    transformers loads a checkpoint of another model type, or one with missing weights, with
    a report on the log and the missing weights freshly random: a model that runs and returns
    nonsense. Both are spec errors here.
    """
    config = AutoConfig.from_pretrained(spec.source)
    if config.model_type != model_type:
        raise ModelSpecError(
            f"{spec.spec!r} is a {config.model_type!r} checkpoint, not {model_type!r}"
        )
    model, info = model_class.from_pretrained(  # type: ignore[attr-defined]
        spec.source, config=config, dtype=dtype, output_loading_info=True, **kwargs
    )
    missing = sorted(info["missing_keys"]) + sorted(k[0] for k in info["mismatched_keys"])
    if missing:
        raise ModelSpecError(
            f"{spec.spec!r} lacks weights for {len(missing)} tensors, e.g. {missing[:5]}"
        )
    return model.to(device)
