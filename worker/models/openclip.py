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
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from PIL import Image

from worker.models.base import TokenizedTexts
from worker.models.device import host_to_device, normalised_cpu
from worker.models.spec import ModelSpec
from worker.models.vision import DEFAULT_VISION, VisionOptions, prepare_vision_tower

PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# SimpleTokenizer memoises every word it has seen; a long-lived worker must bound that.
MAX_BPE_CACHE = 100_000


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
        self.tokenizer = tokenizer
        self.embed_dim = embed_dim
        self.device = device
        self.dtype = dtype
        self.input_dtype = open_clip.get_input_dtype(PRECISIONS[dtype]) or torch.float32
        self.context_length = int(getattr(tokenizer, "context_length", 77) or 77)
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
        batch = list(texts)
        with self._tokenizer_lock:
            truncated = [self._token_count(text) > self.context_length for text in batch]
            tokens = self.tokenizer(batch)
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
