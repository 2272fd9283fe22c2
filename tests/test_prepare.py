"""`ImagePreparer`: which way an image goes for each decoder setting and device placement."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from schemas.errors import ErrorCode, ImageError
from schemas.settings import Settings
from tests.fixtures.bad_images import encode, gradient
from tests.images import photo_like_jpegs
from worker.decode import decode_image
from worker.prepare import ImagePreparer
from worker.tensor_decode import CheckedJpeg

JPEG = photo_like_jpegs(1)[0]
PNG = encode(gradient((320, 240)), "PNG")


@pytest.fixture
def encoder(tiny_encoders: dict[str, Any]) -> Any:
    return tiny_encoders["openclip"]


def test_pil_gives_exactly_the_reference_preprocessing(encoder: Any) -> None:
    prepared = ImagePreparer(Settings(), encoder).prepare(JPEG)
    assert isinstance(prepared, torch.Tensor)
    assert torch.equal(prepared, encoder.preprocess_image(decode_image(JPEG)))


def test_torch_on_a_cpu_model_gives_pixels_close_to_pillows(encoder: Any) -> None:
    preparer = ImagePreparer(Settings(image_decoder="torch"), encoder)
    assert not preparer.device_batches
    prepared = preparer.prepare(JPEG)
    assert isinstance(prepared, torch.Tensor)
    reference = encoder.preprocess_image(decode_image(JPEG))
    assert prepared.shape == reference.shape
    assert (prepared - reference).abs().max() < 0.05  # about one grey level, normalised


def test_device_batches_defer_jpegs_only(encoder: Any) -> None:
    preparer = ImagePreparer(Settings(image_decoder="torch"), encoder, device_batches=True)
    assert isinstance(preparer.prepare(JPEG), CheckedJpeg)
    assert isinstance(preparer.prepare(PNG), torch.Tensor)
    with pytest.raises(TypeError):
        preparer.pixels(JPEG)


def test_device_batches_need_the_torch_decoder(encoder: Any) -> None:
    assert not ImagePreparer(Settings(), encoder, device_batches=True).device_batches


@pytest.mark.parametrize("decoder", ["pil", "torch"])
def test_a_bad_image_raises_its_code_either_way(encoder: Any, decoder: str) -> None:
    preparer = ImagePreparer(Settings(image_decoder=decoder), encoder)  # type: ignore[arg-type]
    with pytest.raises(ImageError) as caught:
        preparer.prepare(JPEG[: len(JPEG) // 2])
    assert caught.value.code == ErrorCode.TRUNCATED_IMAGE


def test_a_batch_decodes_deferred_jpegs_together_and_keeps_the_order(encoder: Any) -> None:
    deferring = ImagePreparer(Settings(image_decoder="torch"), encoder, device_batches=True)
    one_by_one = ImagePreparer(Settings(image_decoder="torch"), encoder)
    images = [JPEG, PNG, JPEG]
    batch = deferring.batch([deferring.prepare(data) for data in images])
    expected = torch.stack([one_by_one.pixels(data) for data in images])
    assert torch.allclose(batch, expected, atol=1e-6)


def test_a_batch_raises_the_failure_of_a_deferred_jpeg(encoder: Any) -> None:
    deferring = ImagePreparer(Settings(image_decoder="torch"), encoder, device_batches=True)
    truncated = deferring.prepare(JPEG[: len(JPEG) // 2])
    with pytest.raises(ImageError):
        deferring.batch([deferring.prepare(PNG), truncated])
