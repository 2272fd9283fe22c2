"""ALIGN (`kakaobrain/align-base`) through transformers' `AlignModel` and `AlignProcessor`.

Preprocessing is the checkpoint's own `AlignProcessor`, loaded with `AutoProcessor`:
- images: `EfficientNetImageProcessor` with the checkpoint's settings (346×346 resize without
  keeping the aspect ratio, centre crop 289, x/127.5 − 1, no mean/std). We use transformers'
  default image-processor backend, torchvision, because that is what `AutoProcessor`,
  `AutoImageProcessor` and `pipeline("zero-shot-image-classification")` pick by default; the
  PIL backend differs from it by up to about one grey level, so parity is defined against the
  default call path.
- texts: the processor's own text defaults, `padding="max_length", max_length=64`, plus
  `truncation=True` (without it one text over 64 tokens makes the whole batch raise). Fixed
  padding also makes a text's embedding independent of its batch-mates. The pipeline pads to
  the longest prompt instead; on the real checkpoint that changes probabilities by about 1e-5
  (about 1e-8 on the tiny test model), and the processor's padding is our reference.

Embeddings: image = EfficientNet global mean (no projection), text = BERT [CLS] through
`text_projection`; both come from `get_*_features(...).pooler_output` (transformers 5.x returns
an output object) and are normalised here. Logits are cosine / temperature: ALIGN's temperature
divides and is not exponentiated. Attention is eager: ALIGN's BERT has no SDPA path.
"""

from __future__ import annotations

import threading

import torch
from transformers import AlignModel, AlignProcessor, AutoProcessor

from worker.models.spec import ModelSpec
from worker.models.transformers_features import TransformersFeatures
from worker.models.transformers_load import load_transformers_model
from worker.models.vision import DEFAULT_VISION, VisionOptions, prepare_vision_tower

MAX_TEXT_TOKENS = 64


class AlignEncoder(TransformersFeatures):
    max_text_tokens = MAX_TEXT_TOKENS
    text_padding = "max_length"
    family = "align"

    def __init__(
        self,
        model_id: str,
        model: AlignModel,
        processor: AlignProcessor,
        device: torch.device,
        dtype: torch.dtype,
        vision: VisionOptions = DEFAULT_VISION,
    ) -> None:
        self.model_id = model_id
        self.model = model.eval()
        self.vision = vision
        prepare_vision_tower(model.vision_model, vision)
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.dtype = dtype
        self.embed_dim = int(model.config.projection_dim)
        self.temperature = float(model.temperature.detach())
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        device: torch.device,
        dtype: torch.dtype,
        vision: VisionOptions = DEFAULT_VISION,
    ) -> AlignEncoder:
        model = load_transformers_model(
            AlignModel, spec, "align", device, dtype, attn_implementation="eager"
        )
        processor = AutoProcessor.from_pretrained(spec.source)
        return cls(spec.spec, model, processor, device, dtype, vision)

    @property
    def logit_scale(self) -> float:
        return 1.0 / self.temperature

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return image_embeds @ text_embeds.T / self.temperature
