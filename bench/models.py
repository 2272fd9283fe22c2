"""The benchmark's two models, both random and both loaded through the real open_clip path.

- `tiny`: the tiny OpenCLIP model from `worker.models.tiny` (2 layers, width 64, patch 32):
  the forward pass costs almost nothing, so queue, decode and I/O overhead dominate.
- `vit-b-16`: open_clip's full `ViT-B-16` architecture (86 M vision parameters, 224 px,
  patch 16) with random weights, saved as a `local-dir:` checkpoint exactly as the tiny one
  is, so the forward pass costs what the real LAION-2B checkpoint costs.

Both are built once into a cache directory (never the repository) and reused.
"""

from __future__ import annotations

import json
from pathlib import Path

from worker.models.spec import LOCAL_DIR_PREFIX

MODELS = ("tiny", "vit-b-16")
DEFAULT_CACHE = Path.home() / ".cache" / "dualstream-bench" / "models"
# As in laion/CLIP-ViT-B-16-laion2B-s34B-b88K's open_clip_config.json.
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def model_spec(name: str, cache: Path = DEFAULT_CACHE) -> str:
    """The model spec for `name`, building its checkpoint into `cache` on first use."""
    if name == "tiny":
        folder = cache / "tiny-openclip"
        if not (folder / "open_clip_config.json").is_file():
            from worker.models.tiny import build_tiny_model

            return build_tiny_model("openclip", folder)
        return LOCAL_DIR_PREFIX + str(folder.resolve())
    if name == "vit-b-16":
        folder = cache / "vit-b-16-random"
        if not (folder / "open_clip_config.json").is_file():
            _build_vit_b_16(folder)
        return LOCAL_DIR_PREFIX + str(folder.resolve())
    raise ValueError(f"unknown benchmark model {name!r}: use one of {', '.join(MODELS)}")


def _build_vit_b_16(folder: Path, seed: int = 1234) -> None:
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = open_clip.get_model_config("ViT-B-16")
    if config is None:
        raise RuntimeError("open_clip does not know the ViT-B-16 architecture")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model("ViT-B-16", pretrained=None)
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    tmp = folder / "open_clip_model.safetensors.tmp"
    save_file(state, tmp)
    tmp.replace(folder / "open_clip_model.safetensors")
    # The config is written last: its presence says the checkpoint is complete.
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": config,
        "preprocess_cfg": {"mean": list(_OPENAI_MEAN), "std": list(_OPENAI_STD)},
    }, indent=2))
