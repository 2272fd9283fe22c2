"""The `Encoder` contract, per family: shapes, dtypes, batch invariance, bad inputs, loading."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from schemas.errors import ErrorCode, ImageError, ModelSpecError, TextError
from worker.embed import embed_images, embed_texts
from worker.models.base import Encoder
from worker.models.loader import load_encoder

FAMILIES = ["align", "openclip", "altclip"]
IMAGE_SIZE = {"align": 289, "openclip": 224, "altclip": 224}
TEXT_LIMIT = {"align": 64, "openclip": 77, "altclip": 77}
LABELS = ["red", "green stripes", "noise", "a blue circle", "a dark room with a pink band"]


def _mean_pairwise_cosine(embeds: torch.Tensor) -> float:
    sims = embeds @ embeds.T
    n = len(embeds)
    return float((sims.sum() - sims.diagonal().sum()) / (n * n - n))


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_implements_the_protocol(family, tiny_encoders, tiny_model_dirs) -> None:
    encoder = tiny_encoders[family]
    assert isinstance(encoder, Encoder)
    assert encoder.family == family
    assert encoder.model_id == tiny_model_dirs[family]
    assert encoder.device == torch.device("cpu")
    assert encoder.dtype == torch.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_answers_for_its_family_knowledge(family, tiny_encoders, sample_images) -> None:
    """Token limit, logit scale and bias; the draft side and tensor preprocessing are checked
    in test_jpeg_draft.py and test_tensor_decode.py."""
    encoder = tiny_encoders[family]
    assert encoder.max_text_tokens == TEXT_LIMIT[family]
    assert encoder.logit_bias is None  # no family here is trained with a sigmoid loss
    images = embed_images(encoder, sample_images[:3])
    texts = embed_texts(encoder, LABELS)[0]
    assert encoder.logit_scale > 0
    torch.testing.assert_close(encoder.logits(images, texts),
                               encoder.logit_scale * images @ texts.T)


@pytest.mark.parametrize("family", FAMILIES)
def test_outputs_are_unit_float32_cpu_rows(family, tiny_encoders, sample_images) -> None:
    encoder = tiny_encoders[family]
    images = embed_images(encoder, sample_images)
    texts, truncated = embed_texts(encoder, LABELS)
    for embeds, count in ((images, len(sample_images)), (texts, len(LABELS))):
        assert embeds.shape == (count, encoder.embed_dim)
        assert embeds.dtype == torch.float32 and embeds.device.type == "cpu"
        torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(count))
    assert truncated == [False] * len(LABELS)


@pytest.mark.parametrize("family", FAMILIES)
def test_preprocess_gives_one_chw_tensor_per_image(family, tiny_encoders, sample_images) -> None:
    encoder = tiny_encoders[family]
    pixels = encoder.preprocess_image(Image.open(io.BytesIO(sample_images[0])).convert("RGB"))
    size = IMAGE_SIZE[family]
    assert pixels.shape == (3, size, size) and pixels.dtype == torch.float32


@pytest.mark.parametrize("family", ["align", "altclip"])
def test_preprocessing_equals_the_processor_default_backend(
    family, tiny_encoders, tiny_model_dirs, sample_images
) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dirs[family])
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in sample_images]
    expected = processor(images=images, return_tensors="pt")["pixel_values"]
    ours = torch.stack([tiny_encoders[family].preprocess_image(image) for image in images])
    torch.testing.assert_close(ours, expected, atol=0, rtol=0)


def test_align_preprocessing_uses_the_checkpoint_settings(tiny_encoders, sample_images) -> None:
    """[-1, 1] scaling and no mean/std: a red JPEG stays red, within [-1, 1]."""
    pixels = tiny_encoders["align"].preprocess_image(Image.open(io.BytesIO(sample_images[0])))
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels[0].mean() > 0.5 and pixels[1].mean() < -0.5


def test_openclip_preprocessing_equals_open_clip_transform(
    tiny_encoders, tiny_model_dirs, sample_images
) -> None:
    import open_clip

    _, _, transform = open_clip.create_model_and_transforms(tiny_model_dirs["openclip"])
    for data in sample_images:
        image = Image.open(io.BytesIO(data))
        expected = transform(image)
        torch.testing.assert_close(tiny_encoders["openclip"].preprocess_image(image), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_item_does_not_depend_on_its_batch_mates(family, tiny_encoders, sample_images) -> None:
    encoder = tiny_encoders[family]
    together = embed_images(encoder, sample_images)
    alone = torch.cat([embed_images(encoder, [data]) for data in sample_images])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    texts = [*LABELS, "a much longer text that pads every other text in the batch " * 3]
    together = embed_texts(encoder, texts)[0]
    alone = torch.cat([embed_texts(encoder, [text])[0] for text in texts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_is_not_collapsed(family, tiny_encoders, sample_images) -> None:
    """Different images and labels stay apart, and different labels win on different images."""
    encoder = tiny_encoders[family]
    images = embed_images(encoder, sample_images)
    labels = embed_texts(encoder, [f"This is a photo of {label}." for label in LABELS])[0]
    assert _mean_pairwise_cosine(images) < 0.9
    assert _mean_pairwise_cosine(labels) < 0.99
    off_diagonal = labels @ labels.T - 2 * torch.eye(len(LABELS))
    assert off_diagonal.max() < 0.999
    winners = encoder.logits(images, labels).argmax(dim=-1)
    assert len(set(winners.tolist())) >= 2


@pytest.mark.parametrize("family", FAMILIES)
def test_over_long_text_is_truncated_and_flagged(family, tiny_encoders) -> None:
    encoder = tiny_encoders[family]
    long_text = "a photo of a red cat sitting on a green chair " * 20
    embeds, truncated = embed_texts(encoder, ["a cat", long_text])
    assert truncated == [False, True]
    assert torch.isfinite(embeds).all()
    assert encoder.tokenize([long_text]).tensors["input_ids"].shape[-1] == TEXT_LIMIT[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_text_at_the_limit_is_not_flagged(family, tiny_encoders) -> None:
    encoder = tiny_encoders[family]
    words = ["cat"] * 200
    fitting = next(
        " ".join(words[:n]) for n in range(200, 0, -1)
        if not encoder.tokenize([" ".join(words[:n])]).truncated[0]
    )
    over = fitting + " cat"
    assert encoder.tokenize([fitting, over]).truncated == [False, True]


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_raises_empty_text(text, tiny_encoders) -> None:
    with pytest.raises(TextError) as caught:
        embed_texts(tiny_encoders["openclip"], ["a cat", text])
    assert caught.value.code is ErrorCode.EMPTY_TEXT


def test_truncated_jpeg_raises_truncated_image(tiny_encoders, sample_images) -> None:
    data = sample_images[2]
    with pytest.raises(ImageError) as caught:
        embed_images(tiny_encoders["align"], [data[: len(data) // 3]])
    assert caught.value.code is ErrorCode.TRUNCATED_IMAGE


def test_bytes_that_are_no_image_raise_not_an_image(tiny_encoders) -> None:
    with pytest.raises(ImageError) as caught:
        embed_images(tiny_encoders["altclip"], [b"this is not an image at all" * 10])
    assert caught.value.code is ErrorCode.NOT_AN_IMAGE


def test_non_rgb_images_are_converted(tiny_encoders, sample_images) -> None:
    encoder = tiny_encoders["altclip"]
    rgb = Image.open(io.BytesIO(sample_images[1])).convert("RGB")
    rgba = rgb.convert("RGBA")
    torch.testing.assert_close(embed_images(encoder, [rgba]), embed_images(encoder, [rgb]))


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_forward_returns_float32_close_to_fp32(
    family, tiny_model_dirs, tiny_encoders, sample_images
) -> None:
    encoder = load_encoder(tiny_model_dirs[family], device="cpu", dtype="bf16")
    assert encoder.dtype == torch.bfloat16
    half = embed_images(encoder, sample_images[:2])
    assert half.dtype == torch.float32
    full = embed_images(tiny_encoders[family], sample_images[:2])
    assert torch.nn.functional.cosine_similarity(half, full).min() > 0.98


@pytest.mark.parametrize(("device", "dtype"), [("tpu", "fp32"), ("cpu", "int8")])
def test_unknown_device_or_dtype_is_a_spec_error(device, dtype, tiny_model_dirs) -> None:
    with pytest.raises(ModelSpecError):
        load_encoder(tiny_model_dirs["align"], device=device, dtype=dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_real_ids_load_offline_from_the_hf_cache(
    family, offline_hf_cache, tiny_encoders, sample_images
) -> None:
    encoder = load_encoder(offline_hf_cache[family], device="cpu")
    assert encoder.family == family
    assert encoder.model_id == offline_hf_cache[family]
    torch.testing.assert_close(
        embed_images(encoder, sample_images[:2]),
        embed_images(tiny_encoders[family], sample_images[:2]),
    )


def test_a_directory_of_the_wrong_family_is_a_spec_error(tiny_model_dirs) -> None:
    with pytest.raises(ModelSpecError):
        load_encoder(tiny_model_dirs["align"], family="altclip", device="cpu")


def test_a_checkpoint_with_missing_weights_is_refused(tiny_model_dirs, tmp_path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    directory = tmp_path / "align"
    shutil.copytree(tiny_model_dirs["align"], directory)
    weights = load_file(directory / "model.safetensors")
    del weights["text_projection.weight"]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelSpecError, match="lacks weights"):
        load_encoder(str(directory), device="cpu")
