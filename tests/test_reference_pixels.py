"""Transparent images reach each family as its reference pipeline sees them.

The references are the calls users make: transformers' `load_image` then the checkpoint's
processor for ALIGN and AltCLIP (what `pipeline("zero-shot-image-classification")` does), and
`Image.open(path).convert("RGB")` then open_clip's transform for OpenCLIP. Ours is the worker's
own path: `ImagePreparer.pixels` (decode_image, then the encoder's preprocessing), then the
encoder's forward. The images hide colour under transparent pixels, so dropping alpha and
compositing it give different embeddings.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.settings import Settings
from tests.fixtures.bad_images import convertible_image_corpus
from worker.prepare import ImagePreparer

FAMILIES = ("align", "openclip", "altclip")
TRANSPARENT = ("png_rgba_hidden_colour", "png_rgba", "png_la", "png_palette_alpha_table",
               "png_palette_transparency", "gif_transparency", "webp_lossless_rgba", "tiff_rgba")
MIN_COSINE = 0.9999

Reference = Callable[[Image.Image], torch.Tensor]  # an RGB PIL image → a normalised embedding


@pytest.fixture(scope="module", params=FAMILIES)
def reference(request: pytest.FixtureRequest, tiny_model_dirs: dict[str, str]
              ) -> tuple[str, Reference]:
    """(family, the family's reference pipeline from an RGB image to its embedding)."""
    family, source = request.param, tiny_model_dirs[request.param]
    if family == "openclip":
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(source)
        model.eval()

        def openclip_embedding(image: Image.Image) -> torch.Tensor:
            with torch.inference_mode():
                return model.encode_image(preprocess(image)[None], normalize=True)[0]

        return family, openclip_embedding
    from transformers import AutoModelForZeroShotImageClassification, AutoProcessor

    extra = {"attn_implementation": "eager"} if family == "align" else {}
    hf_model = AutoModelForZeroShotImageClassification.from_pretrained(source, **extra).eval()
    processor = AutoProcessor.from_pretrained(source)

    def hf_embedding(image: Image.Image) -> torch.Tensor:
        inputs = processor(images=image, return_tensors="pt")
        with torch.inference_mode():
            features = hf_model.get_image_features(**inputs).pooler_output[0]
        return torch.nn.functional.normalize(features, dim=-1)

    return family, hf_embedding


def reference_input(family: str, path: Path) -> Image.Image:
    """The RGB image each family's reference pipeline makes of the file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns when it drops a palette's alpha table
        if family == "openclip":
            return Image.open(path).convert("RGB")
        from transformers.image_utils import load_image

        return load_image(str(path))


def ours(encoder: Any, data: bytes, settings: Settings) -> torch.Tensor:
    pixels = ImagePreparer(settings, encoder).pixels(data)
    return encoder.encode_images(pixels[None])[0]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0))


def write(tmp_path: Path, name: str) -> tuple[Path, bytes]:
    data = dict(convertible_image_corpus())[name]
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("name", TRANSPARENT)
def test_transparent_images_match_each_familys_reference_pipeline(
        reference: tuple[str, Reference], tiny_encoders: dict[str, Any], tmp_path: Path,
        name: str) -> None:
    family, embed_reference = reference
    path, data = write(tmp_path, name)
    expected = embed_reference(reference_input(family, path))
    assert cosine(ours(tiny_encoders[family], data, Settings()), expected) >= MIN_COSINE


def test_hidden_colour_is_kept_by_default_so_compositing_would_not_match(
        reference: tuple[str, Reference], tiny_encoders: dict[str, Any], tmp_path: Path) -> None:
    """What made this case: a composited image is a different input to the reference."""
    family, embed_reference = reference
    path, data = write(tmp_path, "png_rgba_hidden_colour")
    expected = embed_reference(reference_input(family, path))
    composited = ours(tiny_encoders[family], data, Settings(image_background="white"))
    assert cosine(composited, expected) < 0.999


@pytest.mark.parametrize("colour", ["white", "#00c000"])
def test_the_background_setting_composites_before_the_reference_preprocessing(
        reference: tuple[str, Reference], tiny_encoders: dict[str, Any], tmp_path: Path,
        colour: str) -> None:
    family, embed_reference = reference
    path, data = write(tmp_path, "png_rgba_hidden_colour")
    rgba = Image.open(path).convert("RGBA")
    base = Image.new("RGBA", rgba.size, colour)
    composited = Image.alpha_composite(base, rgba).convert("RGB")
    expected = embed_reference(composited)
    got = ours(tiny_encoders[family], data, Settings(image_background=colour))
    assert cosine(got, expected) >= MIN_COSINE


def test_white_is_what_clip_image_processor_does_to_an_rgba_image_itself(
        tiny_model_dirs: dict[str, str], tiny_encoders: dict[str, Any], tmp_path: Path) -> None:
    """AltCLIP's `CLIPImageProcessor`, handed the RGBA image without `load_image`, composites
    onto white (its `convert_to_rgb`): `image_background="white"` gives that input exactly."""
    from transformers import AutoProcessor

    path, data = write(tmp_path, "png_rgba_hidden_colour")
    processor = AutoProcessor.from_pretrained(tiny_model_dirs["altclip"])
    expected = processor(images=Image.open(path), return_tensors="pt")["pixel_values"][0]
    preparer = ImagePreparer(Settings(image_background="white"), tiny_encoders["altclip"])
    np.testing.assert_array_equal(preparer.pixels(data).numpy(), expected.numpy())


def test_an_unknown_background_colour_fails_at_start_up(tiny_encoders: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="image_background"):
        ImagePreparer(Settings(image_background="not-a-colour"), tiny_encoders["openclip"])
