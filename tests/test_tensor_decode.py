"""`image_decoder="torch"`: JPEG batches decoded and preprocessed as tensors on the model's device.

Everything here runs on the CPU (libjpeg-turbo inside torchvision); production runs the same
code with the device set to cuda, where torchvision decodes with nvJPEG.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import redis
import torch
from PIL import Image
from torchvision.transforms import Compose, Lambda

import worker.tensor_decode
from control.objects import LocalOutputStore
from control.results import ResultStore
from schemas.errors import ErrorCode, ImageError
from schemas.jobs import Job, Task
from schemas.keys import RedisKeys
from schemas.results import JobResult, Status
from schemas.settings import Settings
from tests.fixtures.bad_images import (
    bad_image_corpus,
    encode,
    gradient,
    with_exif_orientation,
)
from tests.images import jpeg_bytes, photo_like_jpegs
from worker.decode import DEFAULT_LIMITS, check_jpeg, decode_image
from worker.models.openclip import transform_on_tensors
from worker.models.tensor_preprocess import through_pil
from worker.outputs import ShardWriter
from worker.pipeline import Pipeline
from worker.prepare import ImagePreparer
from worker.sources import SourceReader
from worker.tensor_decode import CheckedJpeg, TensorDecoder, check_for_tensor_decode

FAMILIES = ("align", "openclip", "altclip")
MIN_COSINE = 0.9999
# Passes every header check (it is cut in its entropy-coded data), but cannot be decoded.
TRUNCATED_PHOTO = jpeg_bytes(99)[:2000]


def checked(data: bytes) -> CheckedJpeg:
    jpeg = check_for_tensor_decode(data, DEFAULT_LIMITS)
    assert jpeg is not None
    return jpeg


def pillow_embedding(encoder: Any, data: bytes) -> torch.Tensor:
    return encoder.encode_images(encoder.preprocess_image(decode_image(data))[None])[0]


def pillow_pixels(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(decode_image(data))).permute(2, 0, 1)


def an_xmp_orientation(orientation: int) -> bytes:
    return (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
            b'02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/"'
            b' tiff:Orientation="%d"/></rdf:RDF></x:xmpmeta>' % orientation)


# --- decoding and preprocessing ------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_embeddings_match_the_pillow_path_on_photo_like_jpegs(
    tiny_encoders: dict[str, Any], family: str
) -> None:
    encoder = tiny_encoders[family]
    jpegs = photo_like_jpegs()
    rows = TensorDecoder(encoder, DEFAULT_LIMITS).pixels([checked(data) for data in jpegs])
    assert all(isinstance(row, torch.Tensor) for row in rows)
    tensor_path = encoder.encode_images(torch.stack(rows))  # type: ignore[arg-type]
    pillow_path = torch.stack([pillow_embedding(encoder, data) for data in jpegs])
    cosines = (tensor_path * pillow_path).sum(dim=1)
    assert float(cosines.min()) >= MIN_COSINE, cosines


@pytest.mark.parametrize("family", ["align", "altclip"])
def test_transformers_families_get_the_same_input_as_from_pillow(
    tiny_encoders: dict[str, Any], family: str
) -> None:
    encoder = tiny_encoders[family]
    jpegs = photo_like_jpegs(4)
    rows = TensorDecoder(encoder, DEFAULT_LIMITS).pixels([checked(data) for data in jpegs])
    for data, row in zip(jpegs, rows, strict=True):
        assert torch.equal(row, encoder.preprocess_image(decode_image(data)))  # type: ignore[arg-type]


def test_openclip_input_is_within_a_grey_level_of_pillows(tiny_encoders: dict[str, Any]) -> None:
    encoder = tiny_encoders["openclip"]
    jpegs = photo_like_jpegs(4)
    rows = TensorDecoder(encoder, DEFAULT_LIMITS).pixels([checked(data) for data in jpegs])
    std = torch.tensor(encoder.transform.transforms[-1].std)[:, None, None]
    for data, row in zip(jpegs, rows, strict=True):
        grey_levels = (row - encoder.preprocess_image(decode_image(data))) * std * 255
        assert float(grey_levels.abs().max()) <= 1.01


def test_an_unknown_transform_is_replayed_through_pil_exactly(
    tiny_encoders: dict[str, Any]
) -> None:
    real = tiny_encoders["openclip"]
    transform = Compose([*real.transform.transforms, Lambda(lambda x: x * 2)])
    assert transform_on_tensors(transform) is None
    stub = SimpleNamespace(model_id="stub", preprocess_image=transform)
    images = [pillow_pixels(data) for data in photo_like_jpegs(2)]
    out = through_pil(stub)(images)  # type: ignore[arg-type]
    expected = torch.stack([transform(Image.fromarray(image.permute(1, 2, 0).numpy()))
                            for image in images])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_rotated_jpegs_come_out_upright(tiny_encoders: dict[str, Any],
                                              orientation: int) -> None:
    rng = np.random.default_rng(orientation)
    stored = Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8))
    data = with_exif_orientation(stored, "JPEG", orientation, quality=95)
    decoder = TensorDecoder(tiny_encoders["openclip"], DEFAULT_LIMITS)
    [decoded] = decoder._decode([checked(data)])
    assert decoded is not None
    assert torch.equal(decoded, pillow_pixels(data))
    upright_shape = (3, 50, 30) if orientation >= 5 else (3, 30, 50)
    assert tuple(decoded.shape) == upright_shape


def test_an_xmp_orientation_is_applied_like_pillow(tiny_encoders: dict[str, Any]) -> None:
    data = encode(gradient((50, 30)), "JPEG", xmp=an_xmp_orientation(6))
    [decoded] = TensorDecoder(tiny_encoders["openclip"], DEFAULT_LIMITS)._decode([checked(data)])
    assert decoded is not None and torch.equal(decoded, pillow_pixels(data))
    assert tuple(decoded.shape) == (3, 50, 30)


def test_grayscale_jpegs_decode_to_the_same_rgb_as_pillow(tiny_encoders: dict[str, Any]) -> None:
    data = encode(gradient((64, 48), mode="L"), "JPEG")
    [decoded] = TensorDecoder(tiny_encoders["openclip"], DEFAULT_LIMITS)._decode([checked(data)])
    assert decoded is not None and torch.equal(decoded, pillow_pixels(data))


def test_large_batches_are_decoded_in_chunks_with_the_same_result(
    tiny_encoders: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    decoder = TensorDecoder(tiny_encoders["openclip"], DEFAULT_LIMITS)
    jpegs = [checked(data) for data in photo_like_jpegs(5)]
    whole = decoder.pixels(jpegs)
    monkeypatch.setattr(worker.tensor_decode, "DECODE_CHUNK_PIXELS", 500_000)
    assert [len(chunk) for chunk in worker.tensor_decode._chunks(jpegs)] == [1, 1, 1, 1, 1]
    chunked = decoder.pixels(jpegs)
    for a, b in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)  # type: ignore[arg-type]


# --- what goes the Pillow way, and failures ------------------------------------------------


def test_every_bad_jpeg_fails_with_the_code_pillow_gives_it(tiny_encoders: dict[str, Any]) -> None:
    decoder = TensorDecoder(tiny_encoders["openclip"], DEFAULT_LIMITS)
    jpegs = [(name, data, code) for name, data, code in bad_image_corpus()
             if data[:3] == b"\xff\xd8\xff"]
    jpegs.append(("truncated_photo", TRUNCATED_PHOTO, ErrorCode.TRUNCATED_IMAGE.value))
    assert len(jpegs) >= 6
    for name, data, code in jpegs:
        with pytest.raises(ImageError) as by_pillow:
            decode_image(data)
        assert by_pillow.value.code == code, name
        try:
            failure = decoder.pixels([checked(data)])[0]
        except ImageError as exc:
            failure = exc
        assert isinstance(failure, ImageError) and failure.code == code, (name, failure)


@pytest.mark.parametrize("device_batches", [True, False], ids=["device-batches", "prepare"])
def test_the_checks_run_before_torchvision_sees_a_bomb(
    tiny_encoders: dict[str, Any], monkeypatch: pytest.MonkeyPatch, device_batches: bool
) -> None:
    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torchvision was handed an image that fails the checks")

    monkeypatch.setattr(worker.tensor_decode, "decode_jpeg", never)
    bomb = next(data for name, data, _ in bad_image_corpus()
                if name == "jpeg_claims_30000x30000")
    preparer = ImagePreparer(Settings(image_decoder="torch"), tiny_encoders["openclip"],
                             device_batches=device_batches)
    with pytest.raises(ImageError) as caught:
        preparer.prepare(bomb)
    assert caught.value.code == ErrorCode.IMAGE_TOO_LARGE


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tiny_models_get_the_tensor_preprocessing_not_the_pil_fallback(
    tiny_encoders: dict[str, Any], family: str
) -> None:
    assert tiny_encoders[family].tensor_preprocess is not None


def test_check_jpeg_reads_the_stored_size_mode_and_orientation() -> None:
    header = check_jpeg(with_exif_orientation(gradient((64, 48)), "JPEG", 6))
    assert (header.size, header.mode, header.orientation) == ((64, 48), "RGB", 6)
    with pytest.raises(ImageError) as caught:
        check_jpeg(encode(gradient(), "PNG"))
    assert caught.value.code == ErrorCode.UNSUPPORTED_FORMAT


def test_a_cmyk_jpeg_is_left_to_pillow() -> None:
    data = encode(gradient().convert("CMYK"), "JPEG")
    assert check_jpeg(data).mode == "CMYK"
    assert check_for_tensor_decode(data, DEFAULT_LIMITS) is None


def test_a_truncated_jpeg_in_a_batch_fails_alone(tiny_encoders: dict[str, Any]) -> None:
    encoder = tiny_encoders["openclip"]
    good = photo_like_jpegs(2)
    rows = TensorDecoder(encoder, DEFAULT_LIMITS).pixels(
        [checked(good[0]), checked(TRUNCATED_PHOTO), checked(good[1])])
    assert isinstance(rows[1], ImageError) and rows[1].code == ErrorCode.TRUNCATED_IMAGE
    alone = TensorDecoder(encoder, DEFAULT_LIMITS).pixels([checked(good[0]), checked(good[1])])
    assert torch.equal(rows[0], alone[0]) and torch.equal(rows[2], alone[1])  # type: ignore[arg-type]


# --- the pipeline --------------------------------------------------------------------------


def run_pipeline(redis_url: str, folder: Path, encoder: Any, paths: list[Path],
                 decoder: str, device_batches: bool | None = None,
                 **overrides: Any) -> tuple[list[JobResult], Pipeline]:
    settings = Settings(redis_url=redis_url, model=encoder.model_id, image_decoder=decoder,
                        output_uri=(folder / f"out-{decoder}").as_uri(), local_root=str(folder),
                        key_prefix=f"tensor-{decoder}", **overrides)
    results = ResultStore(redis.Redis.from_url(redis_url), RedisKeys(settings.key_prefix), 3600)
    writer = ShardWriter(LocalOutputStore(settings.output_uri), results, worker="t", lease_s=30)
    pipeline = Pipeline(settings, encoder, SourceReader(settings), writer, results,
                        device_batches=device_batches)
    try:
        jobs = [Job(task=Task.IMAGE_EMBEDDING, image=str(path), model=encoder.model_id,
                    return_embedding=True) for path in paths]
        return [future.result(120) for future in pipeline.submit(jobs)], pipeline
    finally:
        pipeline.close(5)


def write(folder: Path, images: dict[str, bytes]) -> list[Path]:
    paths = []
    for name, data in images.items():
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def mixed_images() -> dict[str, bytes]:
    picture = gradient((320, 240))
    images = {f"photo{i}.jpg": data for i, data in enumerate(photo_like_jpegs(6))}
    images |= {
        "cmyk.jpg": encode(picture.convert("CMYK"), "JPEG"),
        "gray.jpg": encode(picture.convert("L"), "JPEG"),
        "rotated.jpg": with_exif_orientation(picture, "JPEG", 6),
        "picture.png": encode(picture, "PNG"),
        "picture.webp": encode(picture, "WEBP"),
        "picture.gif": encode(picture.convert("P"), "GIF"),
        "picture.bmp": encode(picture, "BMP"),
    }
    return images


# device_batches=True is the route a model on a GPU takes (JPEGs decoded in batches on the
# model thread); False is a CPU model's (each JPEG decoded on a prepare thread).
@pytest.mark.parametrize("device_batches", [True, False], ids=["device-batches", "prepare"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_torch_decoder_pipeline_gives_the_pil_pipelines_embeddings(
    redis_url: str, tmp_path: Path, tiny_encoders: dict[str, Any], family: str,
    device_batches: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoder = tiny_encoders[family]
    paths = write(tmp_path, mixed_images())
    on_device: list[int] = []
    try_pixels = TensorDecoder.try_pixels

    def counted(self: TensorDecoder, jpegs: list[CheckedJpeg]) -> list[torch.Tensor | None]:
        on_device.append(len(jpegs))
        return try_pixels(self, jpegs)

    monkeypatch.setattr(TensorDecoder, "try_pixels", counted)
    embeddings = {}
    for decoder in ("pil", "torch"):
        done, pipeline = run_pipeline(redis_url, tmp_path, encoder, paths, decoder,
                                      device_batches, max_batch_items=16,
                                      max_batch_wait_ms=500)
        assert [r.status for r in done] == [Status.DONE] * len(paths), [r.error for r in done]
        assert pipeline.stats.forward_calls < len(paths)  # JPEGs and the rest batched together
        embeddings[decoder] = np.array([result.embedding for result in done])
    assert sum(on_device) == 8  # the photos, gray.jpg and rotated.jpg; not cmyk.jpg
    assert max(on_device) > 1 if device_batches else max(on_device) == 1
    cosines = (embeddings["pil"] * embeddings["torch"]).sum(axis=1)
    assert cosines.min() >= MIN_COSINE, dict(zip([p.name for p in paths], cosines, strict=True))


@pytest.mark.parametrize("device_batches", [True, False], ids=["device-batches", "prepare"])
def test_a_torch_decoder_pipeline_fails_each_bad_image_alone_with_its_code(
    redis_url: str, tmp_path: Path, tiny_encoders: dict[str, Any], device_batches: bool
) -> None:
    encoder = tiny_encoders["openclip"]
    bad = {f"bad{i:02d}-{name}.jpg": data for i, (name, data, _) in enumerate(bad_image_corpus())}
    bad["truncated_photo.jpg"] = TRUNCATED_PHOTO
    codes = [*(code for _, _, code in bad_image_corpus()), ErrorCode.TRUNCATED_IMAGE.value]
    good = {f"photo{i}.jpg": data for i, data in enumerate(photo_like_jpegs(4))}
    paths = [*write(tmp_path, good | bad), tmp_path / "missing.jpg"]
    results, _ = run_pipeline(redis_url, tmp_path, encoder, paths, "torch", device_batches,
                              max_batch_items=16)
    assert all(result.status is Status.DONE for result in results[: len(good)])
    for path, result, code in zip(paths[len(good):], results[len(good):],
                                  [*codes, ErrorCode.SOURCE_NOT_FOUND.value], strict=True):
        assert result.status is Status.FAILED, path.name
        assert result.error is not None and result.error.code == code, (path.name, result.error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
@pytest.mark.parametrize("family", FAMILIES)
def test_on_a_gpu_the_torch_decoder_pipeline_matches_pil_in_fp16(
    redis_url: str, tmp_path: Path, tiny_model_dirs: dict[str, str], family: str
) -> None:
    from worker.models.loader import load_encoder

    encoder = load_encoder(tiny_model_dirs[family], device="cuda", dtype="fp16",
                           channels_last=True)
    paths = write(tmp_path, mixed_images())
    embeddings = {}
    for decoder in ("pil", "torch"):
        done, _ = run_pipeline(redis_url, tmp_path, encoder, paths, decoder,
                               max_batch_items=16, max_batch_wait_ms=500)
        assert [r.status for r in done] == [Status.DONE] * len(paths), [r.error for r in done]
        embeddings[decoder] = np.array([result.embedding for result in done])
    cosines = (embeddings["pil"] * embeddings["torch"]).sum(axis=1)
    assert cosines.min() >= 0.999, dict(zip([p.name for p in paths], cosines, strict=True))


def test_a_jpeg_torchvision_rejects_is_decoded_by_pillow_on_a_prepare_thread(
    redis_url: str, tmp_path: Path, tiny_encoders: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = photo_like_jpegs(4)
    rejected = photos[2]
    real_decode = worker.tensor_decode.decode_jpeg

    def picky(data: Any, *args: Any, **kwargs: Any) -> Any:
        streams = data if isinstance(data, list) else [data]
        if any(bytes(stream.numpy()) == rejected for stream in streams):
            raise RuntimeError("nvJPEG: unsupported stream")  # as a GPU decoder might
        return real_decode(data, *args, **kwargs)

    pillow_threads: list[str] = []
    with_pillow = ImagePreparer.with_pillow

    def recorded(self: ImagePreparer, data: bytes) -> torch.Tensor:
        pillow_threads.append(threading.current_thread().name)
        return with_pillow(self, data)

    monkeypatch.setattr(worker.tensor_decode, "decode_jpeg", picky)
    monkeypatch.setattr(ImagePreparer, "with_pillow", recorded)
    encoder = tiny_encoders["openclip"]
    paths = write(tmp_path, {f"photo{i}.jpg": data for i, data in enumerate(photos)})
    results, _ = run_pipeline(redis_url, tmp_path, encoder, paths, "torch", True,
                              max_batch_items=8, max_batch_wait_ms=300)
    assert [r.status for r in results] == [Status.DONE] * 4, [r.error for r in results]
    assert len(pillow_threads) == 1 and pillow_threads[0].startswith("ds-fetch")
    exact = pillow_embedding(encoder, rejected).numpy()
    assert np.allclose(results[2].embedding, exact, atol=1e-6)
