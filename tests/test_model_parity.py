"""Each family reproduces its reference library on the same weights, image bytes and texts.

The references are the libraries' own calls: transformers' processor + `forward()` (which
normalises) and `pipeline("zero-shot-image-classification")` for ALIGN and AltCLIP; open_clip's
own transform, tokenizer, `encode_image/encode_text` and `logit_scale.exp()` softmax for
OpenCLIP. Embeddings must agree to cosine ≥ 0.9999, probabilities to 1e-5.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from schemas.jobs import DEFAULT_TEMPLATE, ZeroShotOptions
from worker.embed import embed_images, embed_texts
from worker.zeroshot import LabelEmbeddingCache, score

TEXTS = ["a photo of a cat", "This is a photo of a red square.", "green stripes", "noise"]
CHINESE = ["一张猫的照片", "红色的汽车", "蓝色的天空"]
LABELS = ["red", "green stripes", "noise", "a blue circle", "a dark room with a pink band"]


def _pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _rowwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def _probabilities(encoder: object, image_bytes: list[bytes], labels: list[str]) -> torch.Tensor:
    """Our zero-shot scores as an [N, L] matrix in the labels' order."""
    options = ZeroShotOptions(labels=labels, top_k=len(labels))
    ranked = score(encoder, embed_images(encoder, image_bytes), options, LabelEmbeddingCache())
    return torch.tensor([[dict((s.label, s.score) for s in row)[label] for label in labels]
                         for row in ranked])


# --- ALIGN and AltCLIP: transformers -------------------------------------------------------


@pytest.fixture(scope="module", params=["align", "altclip"])
def hf_reference(request: pytest.FixtureRequest, tiny_model_dirs: dict[str, str]):
    from transformers import AutoModelForZeroShotImageClassification, AutoProcessor

    family = request.param
    source = tiny_model_dirs[family]
    extra = {"attn_implementation": "eager"} if family == "align" else {}
    model = AutoModelForZeroShotImageClassification.from_pretrained(source, **extra).eval()
    return family, model, AutoProcessor.from_pretrained(source)


# What each family's encoder passes to its tokenizer: the reference padding.
HF_TEXT_KWARGS = {
    "align": {"padding": "max_length", "max_length": 64, "truncation": True},
    "altclip": {"padding": True, "max_length": 77, "truncation": True},
}


def test_hf_embeddings_match_forward(hf_reference, tiny_encoders, sample_images) -> None:
    family, model, processor = hf_reference
    texts = TEXTS + (CHINESE if family == "altclip" else [])
    inputs = processor(
        text=texts, images=[_pil(b) for b in sample_images], return_tensors="pt",
        **HF_TEXT_KWARGS[family],
    )
    with torch.inference_mode():
        reference = model(**inputs)
    encoder = tiny_encoders[family]
    image_embeds = embed_images(encoder, sample_images)
    text_embeds, _ = embed_texts(encoder, texts)
    assert _rowwise_cosine(image_embeds, reference.image_embeds).min() >= 0.9999
    assert _rowwise_cosine(text_embeds, reference.text_embeds).min() >= 0.9999


def test_hf_embeddings_match_get_features(hf_reference, tiny_encoders, sample_images) -> None:
    family, model, processor = hf_reference
    images = processor(images=[_pil(b) for b in sample_images], return_tensors="pt")
    texts = processor(text=TEXTS, return_tensors="pt", **HF_TEXT_KWARGS[family])
    with torch.inference_mode():
        image_ref = model.get_image_features(**images).pooler_output
        text_ref = model.get_text_features(**texts).pooler_output
    encoder = tiny_encoders[family]
    assert _rowwise_cosine(embed_images(encoder, sample_images), image_ref).min() >= 0.9999
    assert _rowwise_cosine(embed_texts(encoder, TEXTS)[0], text_ref).min() >= 0.9999


def test_hf_zero_shot_matches_forward_softmax(hf_reference, tiny_encoders, sample_images) -> None:
    family, model, processor = hf_reference
    prompts = [DEFAULT_TEMPLATE.format(label) for label in LABELS]
    inputs = processor(
        text=prompts, images=[_pil(b) for b in sample_images], return_tensors="pt",
        **HF_TEXT_KWARGS[family],
    )
    with torch.inference_mode():
        expected = model(**inputs).logits_per_image.softmax(dim=-1)
    ours = _probabilities(tiny_encoders[family], sample_images, LABELS)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["align", "altclip"])
def test_zero_shot_matches_pipeline(family, tiny_model_dirs, tiny_encoders, sample_images) -> None:
    """Like with like: the pipeline's own stages, given our padding.

    `pipeline(..., tokenizer_kwargs=...)` is accepted but dropped by `_sanitize_parameters`
    in transformers 5.x, so the stages are driven directly. AltCLIP's padding is the
    pipeline's default; ALIGN's is the processor's 64 tokens (the pipeline pads to the longest).
    """
    from transformers import pipeline

    pipe = pipeline("zero-shot-image-classification", model=tiny_model_dirs[family], device="cpu")
    ours = _probabilities(tiny_encoders[family], sample_images, LABELS)
    for image, row in zip(sample_images, ours, strict=True):
        inputs = pipe.preprocess(
            _pil(image), candidate_labels=LABELS, tokenizer_kwargs=HF_TEXT_KWARGS[family]
        )
        expected = {r["label"]: r["score"] for r in pipe.postprocess(pipe.forward(inputs))}
        assert row.tolist() == pytest.approx([expected[label] for label in LABELS], abs=1e-5)


@pytest.mark.parametrize("family", ["align", "altclip"])
def test_zero_shot_matches_plain_pipeline_call(
    family, tiny_model_dirs, tiny_encoders, sample_images
) -> None:
    """The pipeline as users call it; for ALIGN its padding differs, hence the wider 1e-4."""
    from transformers import pipeline

    pipe = pipeline("zero-shot-image-classification", model=tiny_model_dirs[family], device="cpu")
    ours = _probabilities(tiny_encoders[family], sample_images, LABELS)
    tolerance = 1e-4 if family == "align" else 1e-5
    for image, row in zip(sample_images, ours, strict=True):
        expected = {r["label"]: r["score"] for r in pipe(_pil(image), candidate_labels=LABELS)}
        assert row.tolist() == pytest.approx([expected[label] for label in LABELS], abs=tolerance)


def test_altclip_chinese_labels_match_pipeline(tiny_model_dirs, tiny_encoders, sample_images):
    from transformers import pipeline

    labels = ["猫", "红色的汽车", "蓝色的天空", "绿色的树"]
    template = "这是一张{}的照片。"
    source = tiny_model_dirs["altclip"]
    pipe = pipeline("zero-shot-image-classification", model=source, device="cpu")
    encoder = tiny_encoders["altclip"]
    options = ZeroShotOptions(labels=labels, templates=[template], top_k=len(labels))
    ranked = score(encoder, embed_images(encoder, sample_images), options, LabelEmbeddingCache())
    for image, row in zip(sample_images, ranked, strict=True):
        expected = pipe(_pil(image), candidate_labels=labels, hypothesis_template=template)
        assert [r.label for r in row] == [e["label"] for e in expected]
        assert [r.score for r in row] == pytest.approx([e["score"] for e in expected], abs=1e-5)


def test_altclip_tokenizes_chinese_without_unknown_tokens(tiny_encoders) -> None:
    encoder = tiny_encoders["altclip"]
    ids = encoder.tokenize(CHINESE).tensors["input_ids"]
    assert not (ids == encoder.tokenizer.unk_token_id).any()


# --- OpenCLIP: open_clip -------------------------------------------------------------------


@pytest.fixture(scope="module")
def openclip_reference(tiny_model_dirs: dict[str, str]):
    import open_clip

    spec = tiny_model_dirs["openclip"]
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    return model.eval(), preprocess, open_clip.get_tokenizer(spec)


def test_openclip_embeddings_match_open_clip(openclip_reference, tiny_encoders, sample_images):
    model, preprocess, tokenizer = openclip_reference
    pixels = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in sample_images])
    with torch.inference_mode():
        image_ref = model.encode_image(pixels, normalize=True)
        text_ref = model.encode_text(tokenizer(TEXTS), normalize=True)
    encoder = tiny_encoders["openclip"]
    assert _rowwise_cosine(embed_images(encoder, sample_images), image_ref).min() >= 0.9999
    assert _rowwise_cosine(embed_texts(encoder, TEXTS)[0], text_ref).min() >= 0.9999


def test_openclip_zero_shot_matches_open_clip(openclip_reference, tiny_encoders, sample_images):
    model, preprocess, tokenizer = openclip_reference
    pixels = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in sample_images])
    prompts = tokenizer([DEFAULT_TEMPLATE.format(label) for label in LABELS])
    with torch.inference_mode():
        image = model.encode_image(pixels, normalize=True)
        text = model.encode_text(prompts, normalize=True)
        expected = (model.logit_scale.exp() * image @ text.T).softmax(dim=-1)
    ours = _probabilities(tiny_encoders["openclip"], sample_images, LABELS)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
