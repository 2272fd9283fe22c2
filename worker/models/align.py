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
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import AlignModel, AlignProcessor, AutoProcessor

from worker.models.base import TokenizedTexts
from worker.models.device import normalised_cpu
from worker.models.loader import load_transformers_model
from worker.models.spec import ModelSpec

MAX_TEXT_TOKENS = 64


class AlignEncoder:
    family = "align"
    logit_bias: float | None = None

    def __init__(
        self,
        model_id: str,
        model: AlignModel,
        processor: AlignProcessor,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.model_id = model_id
        self.model = model.eval()
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.dtype = dtype
        self.embed_dim = int(model.config.projection_dim)
        self.temperature = float(model.temperature.detach())
        # The fast tokenizer's truncation/padding settings are shared, mutable state.
        self._tokenizer_lock = threading.Lock()

    @classmethod
    def load(cls, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> AlignEncoder:
        model = load_transformers_model(
            AlignModel, spec, "align", device, dtype, attn_implementation="eager"
        )
        processor = AutoProcessor.from_pretrained(spec.source)
        return cls(spec.spec, model, processor, device, dtype)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"][0]

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        batch = list(texts)
        with self._tokenizer_lock:
            lengths = [len(ids) for ids in self.tokenizer(batch, verbose=False)["input_ids"]]
            encoded = self.tokenizer(
                batch,
                padding="max_length",
                max_length=MAX_TEXT_TOKENS,
                truncation=True,
                return_tensors="pt",
            )
        return TokenizedTexts(
            tensors=dict(encoded), truncated=[n > MAX_TEXT_TOKENS for n in lengths]
        )

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return normalised_cpu(out.pooler_output)

    def encode_texts(self, texts: TokenizedTexts) -> torch.Tensor:
        inputs = {name: t.to(self.device) for name, t in texts.tensors.items()}
        with torch.inference_mode():
            out = self.model.get_text_features(**inputs)
        return normalised_cpu(out.pooler_output)

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return image_embeds @ text_embeds.T / self.temperature
