"""Zero-shot scoring: templates, prompt ensembles, the label cache, ranking and multi-label."""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass

import open_clip
import pytest
import torch

from schemas.errors import InvalidJob
from schemas.jobs import DEFAULT_TEMPLATE, ZeroShotOptions
from worker.embed import embed_images
from worker.zeroshot import (
    LabelEmbeddingCache,
    class_embeddings,
    label_scores,
    resolve_templates,
    score,
)

LABELS = ["red", "green stripes", "noise", "a blue circle"]


# --- templates -----------------------------------------------------------------------------


def test_named_template_sets_resolve_to_strings_with_one_slot() -> None:
    assert resolve_templates("default") == (DEFAULT_TEMPLATE,)
    openai = resolve_templates("openai_imagenet")
    simple = resolve_templates("simple_imagenet")
    assert len(openai) == 80 and len(simple) == 7
    assert all(isinstance(t, str) and t.count("{}") == 1 for t in openai + simple)
    assert [t.replace("{}", "cat") for t in openai] == [
        t("cat") for t in open_clip.OPENAI_IMAGENET_TEMPLATES
    ]


def test_template_lists_pass_through_and_unknown_names_fail() -> None:
    assert resolve_templates(["a {}", "the {}"]) == ("a {}", "the {}")
    with pytest.raises(InvalidJob):
        resolve_templates("imagenet_21k")


def test_labels_are_inserted_literally() -> None:
    cache = LabelEmbeddingCache()
    encoder = _RecordingEncoder()
    cache.get(encoder, ["{odd} label", "x"], ["a {} in {braces}"])
    assert encoder.prompts == ["a {odd} label in {braces}", "a x in {braces}"]


# --- prompt ensembles and the cache -------------------------------------------------------


def test_prompt_ensemble_matches_open_clip_zero_shot_classifier(tiny_model_dirs, tiny_encoders):
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    spec = tiny_model_dirs["openclip"]
    model = open_clip.create_model(spec).eval()
    with torch.inference_mode():
        expected = build_zero_shot_classifier(
            model,
            tokenizer=open_clip.get_tokenizer(spec),
            classnames=LABELS,
            templates=open_clip.OPENAI_IMAGENET_TEMPLATES,
            num_classes_per_batch=2,
            device="cpu",
            use_tqdm=False,
        )
    ours = LabelEmbeddingCache().get(
        tiny_encoders["openclip"], LABELS, resolve_templates("openai_imagenet")
    )
    torch.testing.assert_close(ours, expected.T, atol=1e-5, rtol=0)


def test_a_repeated_label_set_costs_no_text_forward(tiny_encoders, sample_images) -> None:
    encoder = tiny_encoders["align"]
    cache = LabelEmbeddingCache()
    images = embed_images(encoder, sample_images[:2])
    options = ZeroShotOptions(labels=LABELS, templates="simple_imagenet")
    first = score(encoder, images, options, cache)
    assert cache.text_forward_passes == 1
    second = score(encoder, images, options, cache)
    assert (cache.text_forward_passes, cache.hits, cache.misses) == (1, 1, 1)
    assert first == second
    score(encoder, images, ZeroShotOptions(labels=LABELS[:2]), cache)
    assert cache.text_forward_passes == 2


def test_large_label_sets_are_encoded_in_bounded_passes() -> None:
    encoder = _RecordingEncoder()
    cache = LabelEmbeddingCache()
    labels = [f"label {i}" for i in range(100)]
    embeds = cache.get(encoder, labels, resolve_templates("simple_imagenet"))
    assert embeds.shape == (100, encoder.embed_dim)
    assert cache.text_forward_passes == 3  # 700 prompts, 256 a pass
    assert max(encoder.batch_sizes) == 256


def test_cache_is_a_bounded_lru() -> None:
    encoder = _RecordingEncoder()
    cache = LabelEmbeddingCache(max_entries=2)
    for labels in (["a"], ["b"], ["a"], ["c"]):  # "b" is least recently used when "c" arrives
        cache.get(encoder, labels, ["{}"])
    assert len(cache) == 2
    cache.get(encoder, ["a"], ["{}"])
    assert cache.text_forward_passes == 3
    cache.get(encoder, ["b"], ["{}"])
    assert cache.text_forward_passes == 4


def test_cache_serves_concurrent_callers_the_same_embeddings(tiny_encoders) -> None:
    encoder = tiny_encoders["openclip"]
    cache = LabelEmbeddingCache()
    results: list[torch.Tensor] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get(encoder, LABELS, ["{}"])))
        for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6 and len(cache) == 1
    for result in results[1:]:
        torch.testing.assert_close(result, results[0])


# --- scores --------------------------------------------------------------------------------


def test_scores_are_sorted_cut_to_top_k_and_sum_to_one(tiny_encoders, sample_images) -> None:
    encoder = tiny_encoders["altclip"]
    images = embed_images(encoder, sample_images)
    full = score(encoder, images, ZeroShotOptions(labels=LABELS, top_k=10), LabelEmbeddingCache())
    top2 = score(encoder, images, ZeroShotOptions(labels=LABELS, top_k=2), LabelEmbeddingCache())
    for ranked, best in zip(full, top2, strict=True):
        scores = [item.score for item in ranked]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)
        assert sorted(item.label for item in ranked) == sorted(LABELS)
        assert best == ranked[:2]


def test_threshold_drops_low_scores_before_top_k() -> None:
    encoder = _StubEncoder(logit_scale=100.0)
    options = ZeroShotOptions(labels=["a", "b", "c"], templates=["{}"], top_k=3, threshold=0.2)
    [ranked] = score(encoder, encoder.image, options, LabelEmbeddingCache())
    assert all(item.score >= 0.2 for item in ranked)
    assert [item.label for item in ranked] == ["a"]


def test_multi_label_without_bias_is_clipped_cosine() -> None:
    encoder = _StubEncoder(logit_scale=100.0)
    labels = encoder.label_embeds
    scores = label_scores(encoder, encoder.image, labels, multi_label=True)
    expected = (encoder.image @ labels.T).clamp(0, 1)
    torch.testing.assert_close(scores, expected)
    assert scores[0, 2] == 0.0  # negative cosine clips to 0: scores are not a distribution


def test_multi_label_with_learned_bias_is_siglip_sigmoid() -> None:
    encoder = _StubEncoder(logit_scale=10.0, logit_bias=-5.0)
    labels = encoder.label_embeds
    scores = label_scores(encoder, encoder.image, labels, multi_label=True)
    expected = torch.sigmoid(10.0 * encoder.image @ labels.T - 5.0)
    torch.testing.assert_close(scores, expected)


def test_multi_label_scores_do_not_depend_on_the_other_labels(tiny_encoders, sample_images):
    encoder = tiny_encoders["align"]
    images = embed_images(encoder, sample_images[:3])

    def scores_of(labels: list[str]) -> dict[str, float]:
        options = ZeroShotOptions(labels=labels, multi_label=True, top_k=len(labels))
        return {s.label: s.score for s in score(encoder, images, options, LabelEmbeddingCache())[0]}

    assert scores_of(LABELS)["red"] == pytest.approx(scores_of(["red", "noise"])["red"], abs=1e-6)


def test_align_logits_are_cosine_over_temperature(tiny_encoders, sample_images) -> None:
    encoder = tiny_encoders["align"]
    images = embed_images(encoder, sample_images[:2])
    labels = class_embeddings(encoder, LABELS, [DEFAULT_TEMPLATE])
    torch.testing.assert_close(
        encoder.logits(images, labels), images @ labels.T / encoder.temperature
    )


# --- stubs ---------------------------------------------------------------------------------


@dataclass
class _StubEncoder:
    """Fixed embeddings: image close to label a, away from label c."""

    logit_scale: float
    logit_bias: float | None = None
    model_id: str = "stub"
    embed_dim: int = 2

    def __post_init__(self) -> None:
        self.image = torch.tensor([[1.0, 0.0]])
        self.label_embeds = torch.nn.functional.normalize(
            torch.tensor([[1.0, 0.1], [0.6, 0.8], [-1.0, 0.2]]), dim=-1
        )

    def tokenize(self, texts):
        from worker.models.base import TokenizedTexts

        index = {"a": 0, "b": 1, "c": 2}
        ids = torch.tensor([index[t] for t in texts])
        return TokenizedTexts(tensors={"input_ids": ids}, truncated=[False] * len(texts))

    def encode_texts(self, texts) -> torch.Tensor:
        return self.label_embeds[texts.tensors["input_ids"]]

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * image_embeds @ text_embeds.T


class _RecordingEncoder:
    """Records prompts and batch sizes; embeds each prompt as a deterministic unit vector."""

    model_id = "recording"
    embed_dim = 8

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.batch_sizes: list[int] = []

    def tokenize(self, texts):
        from worker.models.base import TokenizedTexts

        self.prompts.extend(texts)
        self.batch_sizes.append(len(texts))
        seeds = torch.tensor([zlib.crc32(t.encode()) % 10_000 for t in texts])
        return TokenizedTexts(tensors={"seeds": seeds}, truncated=[False] * len(texts))

    def encode_texts(self, texts) -> torch.Tensor:
        rows = [torch.sin(torch.arange(1, 9) * float(s)) for s in texts.tensors["seeds"]]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)
