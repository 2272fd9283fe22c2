"""Scaled JPEG decoding (`jpeg_draft`): smaller decodes that never starve the model's resize,
the same safety checks, and embeddings close to the exact path on photo-like images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image

from control.objects import LocalOutputStore
from control.results import ResultStore
from schemas.errors import ErrorCode, ImageError
from schemas.jobs import Job, Task
from schemas.keys import RedisKeys
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.bad_images import bad_image_corpus, encode, gradient, with_exif_orientation
from tests.images import photo_like_jpegs
from worker.decode import decode_image
from worker.outputs import ShardWriter
from worker.pipeline import Pipeline
from worker.sources import SourceReader

FAMILIES = ("align", "openclip", "altclip")


@pytest.mark.parametrize(("size", "side", "decoded"), [
    ((1024, 768), 224, (512, 384)),   # 1/4 would leave 192 < 224
    ((640, 480), 224, (320, 240)),
    ((640, 480), 100, (160, 120)),
    ((1024, 768), 96, (128, 96)),     # 1/8 is the deepest libjpeg goes
    ((300, 200), 224, (300, 200)),    # already small: decoded whole
])
def test_a_jpeg_is_decoded_at_the_smallest_scale_that_keeps_both_sides(
    size: tuple[int, int], side: int, decoded: tuple[int, int]
) -> None:
    image = decode_image(encode(gradient(size), "JPEG"), draft_side=side)
    assert image.size == decoded
    assert image.mode == "RGB"
    assert min(image.size) >= min(side, *size)


def test_a_drafted_jpeg_looks_like_the_full_decode_scaled_down() -> None:
    data = encode(gradient((640, 480)), "JPEG", quality=95)
    full = decode_image(data).resize((320, 240), Image.Resampling.BOX)
    drafted = decode_image(data, draft_side=224)
    difference = np.abs(np.asarray(full, np.int16) - np.asarray(drafted, np.int16))
    assert difference.mean() < 2.0


def test_other_formats_are_decoded_whole() -> None:
    for fmt in ("PNG", "WEBP", "BMP", "GIF"):
        assert decode_image(encode(gradient((640, 480)), fmt), draft_side=224).size == (640, 480)


def test_a_drafted_jpeg_is_still_turned_upright() -> None:
    stored = gradient((640, 480))
    data = with_exif_orientation(stored, "JPEG", 6, quality=95)
    assert decode_image(data, draft_side=224).size == (240, 320)


def test_size_limits_apply_to_the_stored_size_not_the_drafted_one() -> None:
    bomb = next(data for name, data, _ in bad_image_corpus()
                if name == "jpeg_claims_30000x30000")
    with pytest.raises(ImageError) as caught:
        decode_image(bomb, draft_side=8)
    assert caught.value.code == ErrorCode.IMAGE_TOO_LARGE


def test_every_bad_jpeg_fails_with_its_code_when_drafted() -> None:
    jpegs = [(name, data, code) for name, data, code in bad_image_corpus()
             if data[:3] == b"\xff\xd8\xff"]
    assert len(jpegs) >= 3
    for name, data, code in jpegs:
        with pytest.raises(ImageError) as caught:
            decode_image(data, draft_side=224)
        assert caught.value.code == code, name


@pytest.mark.parametrize(("family", "side"), [("align", 346), ("openclip", 224),
                                              ("altclip", 224)])
def test_the_draft_side_is_what_the_model_preprocessing_resizes_to(
    tiny_encoders: dict[str, Any], family: str, side: int
) -> None:
    assert tiny_encoders[family].draft_side == side


@pytest.mark.parametrize("family", FAMILIES)
def test_drafted_embeddings_stay_close_to_the_exact_path_on_photo_like_images(
    tiny_encoders: dict[str, Any], family: str
) -> None:
    encoder = tiny_encoders[family]
    side = encoder.draft_side
    cosines = []
    for data in photo_like_jpegs():
        exact = encoder.encode_images(encoder.preprocess_image(decode_image(data))[None])
        drafted = encoder.encode_images(
            encoder.preprocess_image(decode_image(data, draft_side=side))[None])
        cosines.append(float((exact * drafted).sum()))
    assert min(cosines) >= 0.999, cosines
    assert min(cosines) < 1.0  # the option really decodes differently


def test_the_pipeline_drafts_only_when_asked(redis_url: str, tmp_path: Path,
                                             tiny_encoders: dict[str, Any]) -> None:
    encoder = tiny_encoders["openclip"]
    images = []
    for i, data in enumerate(photo_like_jpegs()):
        path = tmp_path / f"photo{i}.jpg"
        path.write_bytes(data)
        images.append(path)
    embeddings = {}
    for draft in (False, True):
        settings = Settings(redis_url=redis_url, model=encoder.model_id, jpeg_draft=draft,
                            output_uri=(tmp_path / f"out-{draft}").as_uri(),
                            local_root=str(tmp_path), key_prefix=f"draft-{draft}")
        results = ResultStore(redis.Redis.from_url(redis_url), RedisKeys(settings.key_prefix),
                              3600)
        writer = ShardWriter(LocalOutputStore(settings.output_uri), results, worker="t",
                             lease_s=30)
        pipeline = Pipeline(settings, encoder, SourceReader(settings), writer, results)
        try:
            jobs = [Job(task=Task.IMAGE_EMBEDDING, image=str(path), model=encoder.model_id,
                        return_embedding=True) for path in images]
            done = [future.result(60) for future in pipeline.submit(jobs)]
        finally:
            pipeline.close(5)
        assert all(result.status is Status.DONE for result in done)
        embeddings[draft] = np.array([result.embedding for result in done])
    exact = np.array([encoder.encode_images(
        encoder.preprocess_image(decode_image(path.read_bytes()))[None])[0].numpy()
        for path in images])
    np.testing.assert_allclose(embeddings[False], exact, atol=1e-6)
    cosines = (embeddings[True] * exact).sum(axis=1)
    assert cosines.min() >= 0.999 and not np.allclose(embeddings[True], exact, atol=1e-6)
