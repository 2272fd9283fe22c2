"""AltCLIP (`BAAI/AltCLIP`) through transformers' `AltCLIPModel` and `AltCLIPProcessor`.

AltCLIP pairs a CLIP ViT-L/14 image tower with a bilingual (English and Chinese) XLM-R text
tower, so Chinese labels and queries work unchanged.

Preprocessing is the checkpoint's own `AltCLIPProcessor`, loaded with `AutoProcessor`:
- images: `CLIPImageProcessor` (shortest side 224, bicubic, centre crop 224, OpenAI mean/std),
  with transformers' default backend, torchvision: it is what `AutoProcessor` and
  `pipeline("zero-shot-image-classification")` use by default (the PIL backend differs by up
  to about one grey level). It is not interchangeable with open_clip's transform, which can
  crop one pixel apart.
- texts: the XLM-R SentencePiece tokenizer (cased) with the original code's
  `padding=True, truncation=True, max_length=77`; the processor itself sets no defaults. The
  zero-shot pipeline pads the same way, so its probabilities are directly comparable.

Embeddings are `get_*_features(...).pooler_output` (projected, not normalised in transformers
5.x), normalised here; logits are `logit_scale.exp() * cosine`.
"""

from __future__ import annotations

import threading

import torch
from transformers import AltCLIPModel, AltCLIPProcessor, AutoProcessor

from worker.models.spec import ModelSpec
from worker.models.transformers_features import TransformersFeatures
from worker.models.transformers_load import load_transformers_model
from worker.models.vision import DEFAULT_VISION, VisionOptions, prepare_vision_tower

MAX_TEXT_TOKENS = 77


class AltClipEncoder(TransformersFeatures):
    max_text_tokens = MAX_TEXT_TOKENS
    text_padding = True
    family = "altclip"

    def __init__(
        self,
        model_id: str,
        model: AltCLIPModel,
        processor: AltCLIPProcessor,
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
        self.logit_scale = float(model.logit_scale.detach().exp())
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        device: torch.device,
        dtype: torch.dtype,
        vision: VisionOptions = DEFAULT_VISION,
    ) -> AltClipEncoder:
        model = load_transformers_model(AltCLIPModel, spec, "altclip", device, dtype)
        processor = AutoProcessor.from_pretrained(spec.source)
        return cls(spec.spec, model, processor, device, dtype, vision)

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * image_embeds @ text_embeds.T
