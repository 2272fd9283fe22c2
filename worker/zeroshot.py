"""Zero-shot labels: candidate labels → prompt embeddings → scores per image.

Class embeddings are built as open_clip's `build_zero_shot_classifier` builds them: every
label is written into every template, the normalised text embeddings are averaged over the
templates and the mean is renormalised. With one template this is just the prompt's embedding,
so single-template scores equal `pipeline("zero-shot-image-classification")`'s.

Text forward passes are the expensive part and the same label sets recur across jobs, so class
embeddings are kept in a bounded, thread-safe LRU cache keyed by (model id, labels, templates).

Scores:
- default: a softmax over the labels of the model's own logits (`encoder.logits`: the
  family's logit scale, or ALIGN's temperature). Scores sum to 1 over the candidate labels,
  exactly like the reference `logits_per_image.softmax(dim=-1)`.
- `multi_label`: each label is scored on its own, so scores are independent per label and not
  a distribution (they need not sum to 1; adding a label never changes another's score). For a
  model trained with a sigmoid loss and a learned `logit_bias` (open_clip SigLIP models) the
  score is `sigmoid(logit + logit_bias)`, the probability that model was trained to give. The
  contrastive (softmax-trained) models have no such calibration, so their score is the raw
  cosine similarity of image and label, clipped to [0, 1]; compare it across labels and
  images of one model, and pick thresholds per model.
Labels are sorted by score (ties keep the caller's order), `threshold` drops labels scoring
below it, then `top_k` keeps the best.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from schemas.errors import InvalidJob
from schemas.jobs import DEFAULT_TEMPLATE, ZeroShotOptions
from schemas.results import LabelScore
from worker.models.base import Encoder

PROMPTS_PER_PASS = 256
CacheKey = tuple[str, tuple[str, ...], tuple[str, ...]]


def resolve_templates(templates: Sequence[str] | str) -> tuple[str, ...]:
    """A list of templates, or the name of a set: default, openai_imagenet, simple_imagenet."""
    if not isinstance(templates, str):
        return tuple(templates)
    if templates == "default":
        return (DEFAULT_TEMPLATE,)
    import open_clip

    named = {
        "openai_imagenet": open_clip.OPENAI_IMAGENET_TEMPLATES,
        "simple_imagenet": open_clip.SIMPLE_IMAGENET_TEMPLATES,
    }
    if templates not in named:
        raise InvalidJob(f"unknown template set {templates!r}: use default, {', '.join(named)}")
    # open_clip's templates are functions of the class name (lambdas); turn them into "{}" strings.
    return tuple(t("{}") if callable(t) else t for t in named[templates])


def fill(template: str, label: str) -> str:
    """The template's one `{}` slot, filled; other braces and the label are taken literally."""
    return template.replace("{}", label, 1)


def class_embeddings(
    encoder: Encoder,
    labels: Sequence[str],
    templates: Sequence[str],
    *,
    on_forward: Callable[[], None] | None = None,
) -> torch.Tensor:
    """[L, D]: per label, the renormalised mean of its prompts' normalised embeddings."""
    prompts = [fill(template, label) for label in labels for template in templates]
    chunks = []
    for start in range(0, len(prompts), PROMPTS_PER_PASS):
        batch = prompts[start : start + PROMPTS_PER_PASS]
        chunks.append(encoder.encode_texts(encoder.tokenize(batch)))
        if on_forward is not None:
            on_forward()
    per_prompt = torch.cat(chunks).view(len(labels), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


class LabelEmbeddingCache:
    """Bounded LRU of class embeddings; `text_forward_passes` counts the passes it paid for."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self.text_forward_passes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[CacheKey, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(
        self, encoder: Encoder, labels: Sequence[str], templates: Sequence[str]
    ) -> torch.Tensor:
        key: CacheKey = (encoder.model_id, tuple(labels), tuple(templates))
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return cached
            self.misses += 1
        # Computed outside the lock: other label sets are served meanwhile.
        embeds = class_embeddings(encoder, key[1], key[2], on_forward=self._count_forward)
        with self._lock:
            self._entries[key] = embeds
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return embeds

    def _count_forward(self) -> None:
        with self._lock:
            self.text_forward_passes += 1


def label_scores(
    encoder: Encoder, image_embeds: torch.Tensor, label_embeds: torch.Tensor, *, multi_label: bool
) -> torch.Tensor:
    """[N, L] scores: softmax over labels, or independent per-label scores (see module doc)."""
    logits = encoder.logits(image_embeds, label_embeds)
    if not multi_label:
        return logits.softmax(dim=-1)
    if encoder.logit_bias is not None:
        return torch.sigmoid(logits + encoder.logit_bias)
    return (image_embeds @ label_embeds.T).clamp(0.0, 1.0)


def score(
    encoder: Encoder,
    image_embeds: torch.Tensor,
    options: ZeroShotOptions,
    cache: LabelEmbeddingCache,
) -> list[list[LabelScore]]:
    """Per image, its labels ranked by score, thresholded, then cut to `top_k`."""
    if len(image_embeds) == 0:
        return []
    templates = resolve_templates(options.templates)
    label_embeds = cache.get(encoder, options.labels, templates)
    scores = label_scores(encoder, image_embeds, label_embeds, multi_label=options.multi_label)
    return [_rank(options.labels, row, options.top_k, options.threshold) for row in scores]


def _rank(
    labels: Sequence[str], scores: torch.Tensor, top_k: int, threshold: float | None
) -> list[LabelScore]:
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    ranked = [LabelScore(label=labels[i], score=float(scores[i])) for i in order]
    if threshold is not None:
        ranked = [item for item in ranked if item.score >= threshold]
    return ranked[:top_k]
