"""OpenCLIP (e.g. `hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K`) through open_clip's factory.

Everything comes from open_clip itself, so a checkpoint behaves here exactly as in open_clip:
- the model and its inference transform from `create_model_and_transforms` (for ViT-B/16
  LAION-2B: shortest side 224 bicubic, centre crop 224, OpenAI mean/std, built from the
  checkpoint's `preprocess_cfg`); loading is safetensors first and `weights_only=True`;
- the tokenizer from `get_tokenizer` (CLIP BPE, lower-cased, context 77; an HF tokenizer
  where the checkpoint names one);
- half precision as open_clip's `precision="fp16"/"bf16"` (OpenAI-style mixed precision),
  with inputs cast to `get_input_dtype`.

Logits are `logit_scale.exp() * cosine`. SigLIP-style checkpoints also carry a learned
`logit_bias`, exposed as `logit_bias` for independent (sigmoid) per-label scores.

The tensor form of the transform (`transform_on_tensors`) replays it step by step with
torchvision's v2 functional ops, with each step's own parameters. Resizing a tensor is not
Pillow's resize: torchvision's antialiased bicubic is built to follow Pillow's, and lands
within a grey level of it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from open_clip.transform import MaybeConvertMode
from PIL import Image
from torchvision.transforms import CenterCrop, Normalize, Resize, ToTensor
from torchvision.transforms.v2 import functional as F

from worker.models.base import TensorPreprocess, TokenizedTexts
from worker.models.device import host_to_device, normalised_cpu
from worker.models.draft_size import transform_side
from worker.models.spec import ModelSpec
from worker.models.tokens import clip_bpe_tokens, open_clip_hf_tokens
from worker.models.vision import DEFAULT_VISION, VisionOptions, prepare_vision_tower

PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# SimpleTokenizer memoises every word it has seen; a long-lived worker must bound that.
MAX_BPE_CACHE = 100_000

_ImageStep = Callable[[torch.Tensor], torch.Tensor]


class OpenClipEncoder:
    family = "openclip"

    def __init__(
        self,
        model_id: str,
        model: open_clip.CLIP | open_clip.CustomTextCLIP,
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[..., torch.Tensor],
        embed_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        vision: VisionOptions = DEFAULT_VISION,
    ) -> None:
        self.model_id = model_id
        self.model = model.eval()
        self.vision = vision
        prepare_vision_tower(model.visual, vision)
        self.transform = transform
        self.draft_side = transform_side(transform)
        self.tensor_preprocess = transform_on_tensors(transform)
        self.tokenizer = tokenizer
        self.embed_dim = embed_dim
        self.device = device
        self.dtype = dtype
        self.input_dtype = open_clip.get_input_dtype(PRECISIONS[dtype]) or torch.float32
        self.max_text_tokens = int(getattr(tokenizer, "context_length", 77) or 77)
        self.logit_scale = float(model.logit_scale.detach().exp())
        bias = getattr(model, "logit_bias", None)
        self.logit_bias: float | None = None if bias is None else float(bias.detach())
        # HF tokenizers keep truncation/padding as shared state; the BPE cache is shared too.
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        device: torch.device,
        dtype: torch.dtype,
        vision: VisionOptions = DEFAULT_VISION,
    ) -> OpenClipEncoder:
        model, _, transform = open_clip.create_model_and_transforms(
            spec.source,
            pretrained=spec.pretrained,
            device=device,
            precision=PRECISIONS[dtype],
            weights_only=True,
        )
        tokenizer = open_clip.get_tokenizer(spec.source)
        config = open_clip.get_model_config(spec.source) or {}
        embed_dim = int(config.get("embed_dim", 0)) or _probe_embed_dim(model, tokenizer, device)
        return cls(spec.spec, model, transform, tokenizer, embed_dim, device, dtype, vision)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        with self._tokenizer_lock:
            tokens, truncated = self._tokenize(list(texts))
            self._bound_bpe_cache()
        return TokenizedTexts(tensors={"input_ids": tokens}, truncated=truncated)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        batch = host_to_device(pixels, self.device, self.input_dtype, self.vision.memory_format)
        with torch.inference_mode():
            features = self.model.encode_image(batch)
        return normalised_cpu(features)

    def encode_texts(self, texts: TokenizedTexts) -> torch.Tensor:
        with torch.inference_mode():
            features = self.model.encode_text(texts.tensors["input_ids"].to(self.device))
        return normalised_cpu(features)

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * image_embeds @ text_embeds.T

    def _tokenize(self, batch: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """The tokenizer's ids, and per text whether it was cut: one pass for the standard
        tokenizers; a reduction or HF "clips" mode keeps the library's call and counts apart."""
        tokenizer, context = self.tokenizer, self.max_text_tokens
        if isinstance(tokenizer, SimpleTokenizer) and tokenizer.reduction_fn is None:
            return clip_bpe_tokens(tokenizer, batch, context)
        if isinstance(tokenizer, HFTokenizer) and tokenizer.tokenizer_mode != "clips":
            return open_clip_hf_tokens(tokenizer, batch, context)
        return tokenizer(batch, context), [self._token_count(t) > context for t in batch]

    def _token_count(self, text: str) -> int:
        """Tokens the text needs, start and end tokens included, before truncation."""
        if isinstance(self.tokenizer, SimpleTokenizer):
            return len(self.tokenizer.encode(text)) + 2
        if isinstance(self.tokenizer, HFTokenizer):
            cleaned = self.tokenizer.clean_fn(text)
            return len(self.tokenizer.tokenizer(cleaned, verbose=False)["input_ids"])
        return 0  # an unknown tokenizer: truncation is not reported

    def _bound_bpe_cache(self) -> None:
        cache = getattr(self.tokenizer, "cache", None)
        if isinstance(self.tokenizer, SimpleTokenizer) and cache and len(cache) > MAX_BPE_CACHE:
            special = ("<start_of_text>", "<end_of_text>")
            self.tokenizer.cache = {t: t for t in special if t in cache}


def _probe_embed_dim(
    model: open_clip.CLIP | open_clip.CustomTextCLIP,
    tokenizer: Callable[..., torch.Tensor],
    device: torch.device,
) -> int:
    """Embedding width for a model whose config does not state it: one tiny text forward."""
    with torch.inference_mode():
        return int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])


def transform_on_tensors(transform: Any) -> TensorPreprocess | None:
    """open_clip's transform on uint8 tensors, or None if a step has no exact tensor form here."""
    steps = _tensor_steps(transform)
    return None if steps is None else partial(_with_steps, *steps)


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


def _tensor_steps(transform: Any) -> tuple[list[_ImageStep], list[_ImageStep]] | None:
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
