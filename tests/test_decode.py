"""decode_image: the allow-list, the limits, the error codes and every documented conversion."""

from __future__ import annotations

import io
import random
import resource
import tracemalloc
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

import worker.decode as decode
from schemas.errors import ErrorCode, ImageError
from tests.fixtures.bad_images import (
    BOMB_SIDE,
    bad_image_corpus,
    convertible_image_corpus,
    encode,
    gif_bytes,
    gradient,
    jpeg_with_scans,
    png_bomb,
    webp_vp8x_header,
    with_exif_orientation,
)
from worker.decode import ImageLimits, decode_image

BAD = {name: (data, code) for name, data, code in bad_image_corpus()}
CONVERTIBLE = dict(convertible_image_corpus())


def code_of(data: bytes, limits: ImageLimits = decode.DEFAULT_LIMITS) -> ErrorCode:
    with pytest.raises(ImageError) as raised:
        decode_image(data, limits)
    return raised.value.code


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def half_and_half(left: str, right: str, size: tuple[int, int] = (32, 16)) -> Image.Image:
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


# --- the corpus --------------------------------------------------------------------------


def test_corpus_is_big_enough_and_covers_every_code() -> None:
    assert len(BAD) >= 20
    assert len(CONVERTIBLE) >= 10
    assert {code for _, code in BAD.values()} == {
        ErrorCode.EMPTY_SOURCE,
        ErrorCode.UNSUPPORTED_FORMAT,
        ErrorCode.CORRUPT_IMAGE,
        ErrorCode.IMAGE_TOO_LARGE,
    }


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_bad_corpus_item_fails_with_its_expected_code(name: str) -> None:
    data, expected = BAD[name]
    assert code_of(data) == expected


@pytest.mark.parametrize("name", sorted(CONVERTIBLE))
def test_every_convertible_corpus_item_becomes_a_loaded_rgb_image(name: str) -> None:
    image = decode_image(CONVERTIBLE[name])
    assert image.mode == "RGB"
    assert type(image) is Image.Image  # not an ImageFile: nothing lazy, no file behind it
    assert getattr(image, "fp", None) is None
    assert image.info == {}


# --- source checks and the allow-list ----------------------------------------------------


def test_zero_bytes_is_empty_source() -> None:
    assert code_of(b"") == ErrorCode.EMPTY_SOURCE


def test_more_than_max_bytes_is_source_too_large_before_parsing() -> None:
    png = CONVERTIBLE["png_rgb"]
    assert code_of(png, ImageLimits(max_bytes=len(png) - 1)) == ErrorCode.SOURCE_TOO_LARGE
    # Garbage of the same length proves no parser ran: it would be UNSUPPORTED_FORMAT.
    garbage = b"\x00" * len(png)
    assert code_of(garbage, ImageLimits(max_bytes=len(png) - 1)) == ErrorCode.SOURCE_TOO_LARGE
    assert decode_image(png, ImageLimits(max_bytes=len(png))).size == (64, 48)


def test_text_file_named_jpg_is_unsupported_format() -> None:
    assert code_of(BAD["text_named_jpg"][0]) == ErrorCode.UNSUPPORTED_FORMAT


@pytest.mark.parametrize("name", ["xbm_text", "eps_text", "tiff", "ico", "tga", "pcx", "ppm"])
def test_formats_pillow_would_open_are_unsupported_format(name: str) -> None:
    data = BAD[name][0]
    with Image.open(io.BytesIO(data)):  # the trap: Pillow itself would happily read these
        pass
    assert code_of(data) == ErrorCode.UNSUPPORTED_FORMAT


def test_allow_list_is_exactly_jpeg_png_webp_gif_bmp() -> None:
    assert decode.ALLOWED_FORMATS == ("JPEG", "PNG", "WEBP", "GIF", "BMP")


# --- limits and decompression bombs ------------------------------------------------------


def test_decompression_bomb_png_is_rejected_by_pixel_count_without_decoding() -> None:
    bomb = png_bomb()  # valid data for 30000x30000 pixels: a full decode needs 900 MB
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        assert code_of(bomb) == ErrorCode.IMAGE_TOO_LARGE
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kib) * 1024
    assert len(bomb) < 200_000
    assert python_peak < 10 * 2**20
    assert rss_growth < 100 * 2**20  # the process peak, so it catches Pillow's C allocations


def test_png_bomb_generator_makes_a_valid_png() -> None:
    # The same generator at a decodable size, so the bomb above is a real bomb.
    image = decode_image(png_bomb(side=300))
    assert image.size == (300, 300)
    assert pixels(image).max() == 0


def test_decompression_bomb_gif_and_webp_are_rejected_by_pixel_count() -> None:
    assert code_of(gif_bytes((BOMB_SIDE, BOMB_SIDE), (1, 1))) == ErrorCode.IMAGE_TOO_LARGE
    # Without the header check libwebp's decoder would be created (and allocate), then fail
    # on the missing bitstream as CORRUPT_IMAGE.
    assert code_of(webp_vp8x_header(10_000, 10_000)) == ErrorCode.IMAGE_TOO_LARGE
    small = ImageLimits(max_pixels=99)
    assert code_of(encode(gradient((10, 10)), "WEBP", lossless=True), small) == (
        ErrorCode.IMAGE_TOO_LARGE
    )
    assert code_of(encode(gradient((10, 10)), "WEBP"), small) == ErrorCode.IMAGE_TOO_LARGE


def test_max_pixels_is_an_inclusive_limit() -> None:
    png = encode(gradient((10, 10)), "PNG")
    assert decode_image(png, ImageLimits(max_pixels=100)).size == (10, 10)
    assert code_of(png, ImageLimits(max_pixels=99)) == ErrorCode.IMAGE_TOO_LARGE


def test_max_side_rejects_a_long_thin_image() -> None:
    assert code_of(BAD["png_side_30000x1"][0]) == ErrorCode.IMAGE_TOO_LARGE
    thin = encode(Image.new("L", (100, 1)), "PNG")
    assert code_of(thin, ImageLimits(max_side=99)) == ErrorCode.IMAGE_TOO_LARGE
    assert decode_image(thin, ImageLimits(max_side=100)).size == (100, 1)


def test_pillow_bomb_warning_raised_as_error_becomes_image_too_large() -> None:
    # pytest turns warnings into errors; a first GIF frame that grows the canvas to
    # 100 MP makes Pillow warn before decode_image sees the size.
    assert code_of(gif_bytes((1, 1), (10_000, 10_000))) == ErrorCode.IMAGE_TOO_LARGE


def test_pillow_bomb_warning_does_not_let_the_image_through_when_only_warned() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert code_of(gif_bytes((1, 1), (10_000, 10_000))) == ErrorCode.IMAGE_TOO_LARGE
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)


def test_pillow_bomb_error_becomes_image_too_large_even_with_raised_limits() -> None:
    huge = ImageLimits(max_pixels=10**12, max_side=10**6)
    assert code_of(gif_bytes((1, 1), (20_000, 20_000)), huge) == ErrorCode.IMAGE_TOO_LARGE


# --- truncated and corrupt input ---------------------------------------------------------


@pytest.mark.parametrize("name", ["jpeg_rgb", "png_rgb", "webp_lossy", "webp_lossless_rgba"])
@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75])
def test_truncated_jpeg_png_webp_are_corrupt(name: str, fraction: float) -> None:
    data = CONVERTIBLE[name]
    assert code_of(data[: int(len(data) * fraction)]) == ErrorCode.CORRUPT_IMAGE


def test_truncated_images_are_not_loaded_and_the_global_flag_stays_off() -> None:
    data = CONVERTIBLE["jpeg_rgb"]
    assert code_of(data[:-100]) == ErrorCode.CORRUPT_IMAGE
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_jpeg_with_more_scans_than_the_limit_is_corrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    data = jpeg_with_scans(decode.MAX_JPEG_SCANS + 1)
    assert code_of(data) == ErrorCode.CORRUPT_IMAGE
    monkeypatch.setattr(decode, "MAX_JPEG_SCANS", 10**6)
    assert decode_image(data).size == (64, 64)  # libjpeg decodes it: only the limit stops it


def test_random_bytes_truncations_and_bit_flips_raise_only_image_error() -> None:
    rng = random.Random(20240601)
    for data in _fuzz_inputs(rng):
        try:
            image = decode_image(data)
        except ImageError as error:
            assert isinstance(error.code, ErrorCode)
        else:
            assert image.mode == "RGB"


def _fuzz_inputs(rng: random.Random) -> Iterator[bytes]:
    signatures = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBP", b"GIF89a", b"BM"]
    for _ in range(200):
        yield rng.randbytes(rng.randint(1, 512))
        yield rng.choice(signatures) + rng.randbytes(rng.randint(0, 512))
    for data in CONVERTIBLE.values():
        for cut in range(1, len(data), max(1, len(data) // 40)):
            yield data[:cut]
        for _ in range(40):
            flipped = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            yield bytes(flipped)


# --- conversions -------------------------------------------------------------------------


def test_cmyk_jpeg_converts_to_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.paste((255, 255, 0, 0), (8, 0, 16, 16))  # pure blue
    image = decode_image(encode(cmyk, "JPEG", quality=95))
    assert np.abs(pixels(image)[8, 2] - (255, 0, 0)).max() <= 8
    assert np.abs(pixels(image)[8, 13] - (0, 0, 255)).max() <= 8


def test_16_bit_grayscale_png_is_scaled_to_8_bit_not_almost_white() -> None:
    values = np.array([[0, 255, 256, 0x7FFF, 0x8000, 0xFFFF]], dtype=np.uint16)
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    image = decode_image(encode(source, "PNG"))
    assert pixels(image)[0, :, 0].tolist() == [0, 0, 1, 127, 128, 255]
    assert (pixels(image)[..., 0] == pixels(image)[..., 2]).all()
    gradient_16 = decode_image(CONVERTIBLE["png_16bit_gray"])
    assert 50 < pixels(gradient_16).mean() < 200  # Pillow's own convert gives ~254


def test_16_bit_grayscale_png_colour_key_becomes_white() -> None:
    values = np.array([[1000, 0x4000]], dtype=np.uint16)
    image = decode_image(encode(Image.fromarray(values), "PNG", transparency=1000))
    assert pixels(image)[0].tolist() == [[255, 255, 255], [64, 64, 64]]


def test_palette_image_converts_through_its_palette() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0])
    palette.putpixel((1, 0), 1)
    image = decode_image(encode(palette, "PNG"))
    assert pixels(image)[0].tolist() == [[10, 20, 30], [200, 100, 0]]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_composited_onto_white(fmt: str) -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red (transparent), 1 blue
    palette.putpixel((1, 0), 1)
    image = decode_image(encode(palette, fmt, transparency=0))
    assert pixels(image)[0].tolist() == [[255, 255, 255], [0, 0, 255]]


def test_rgba_is_composited_onto_white_like_clip_image_processor() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    image = decode_image(encode(rgba, "PNG"))
    # Pillow's convert("RGB") would give red for the first pixel and black for the last.
    assert pixels(image)[0].tolist() == [[255, 255, 255], [0, 0, 255], [127, 127, 127]]


def test_la_is_composited_onto_white() -> None:
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (40, 255)])
    image = decode_image(encode(la, "PNG"))
    assert pixels(image)[0].tolist() == [[255, 255, 255], [40, 40, 40]]


def test_pa_is_composited_onto_white() -> None:
    # No allowed format decodes to PA today; this pins the conversion should one start to.
    pa = Image.new("PA", (2, 1))
    pa.putpalette([0, 255, 0, 0, 0, 0])
    pa.putdata([(0, 0), (0, 255)])
    assert pixels(decode._to_rgb(pa))[0].tolist() == [[255, 255, 255], [0, 255, 0]]


def test_alpha_and_palette_conversions_match_transformers_convert_to_rgb() -> None:
    image_transforms = pytest.importorskip("transformers.image_transforms")
    # Orientation and 16-bit scaling are where decode_image deliberately differs.
    deliberate = {"jpeg_exif_orientation_6", "jpeg_exif_orientation_8", "png_exif_orientation_6"}
    deliberate |= {"png_16bit_gray"}
    for name, data in CONVERTIBLE.items():
        if name in deliberate:
            continue
        with Image.open(io.BytesIO(data)) as source:
            expected = image_transforms.convert_to_rgb(source, return_numpy=True)
        np.testing.assert_array_equal(np.asarray(decode_image(data)), expected, err_msg=name)


@pytest.mark.parametrize(("orientation", "top", "bottom"), [(6, "red", "blue"), (8, "blue", "red")])
def test_exif_orientation_6_and_8_swap_the_size_and_rotate_the_pixels(
    orientation: int, top: str, bottom: str
) -> None:
    stored = half_and_half("red", "blue")  # 32x16: red on the left, blue on the right
    image = decode_image(with_exif_orientation(stored, "JPEG", orientation, quality=95))
    assert image.size == (16, 32)
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    assert np.abs(pixels(image)[4, 8] - colours[top]).max() <= 8
    assert np.abs(pixels(image)[27, 8] - colours[bottom]).max() <= 8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow_exif_transpose(orientation: int) -> None:
    data = with_exif_orientation(gradient((7, 5)), "PNG", orientation)
    with Image.open(io.BytesIO(data)) as source:
        expected = np.asarray(ImageOps.exif_transpose(source).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(decode_image(data)), expected)


def test_orientation_is_not_applied_twice_downstream() -> None:
    image = decode_image(CONVERTIBLE["jpeg_exif_orientation_6"])
    assert image.getexif().get(0x0112) is None
    np.testing.assert_array_equal(np.asarray(ImageOps.exif_transpose(image)), np.asarray(image))


@pytest.mark.parametrize(
    "name", ["gif_two_frames", "webp_two_frames", "apng_two_frames", "mpo_two_frames"]
)
def test_animated_and_multi_picture_images_give_their_first_frame(name: str) -> None:
    image = decode_image(CONVERTIBLE[name])  # a red frame, then a blue one
    assert np.abs(pixels(image) - (255, 0, 0)).max() <= 8


def test_grayscale_l_becomes_rgb_with_equal_channels() -> None:
    gray = gradient(mode="L")
    image = decode_image(encode(gray, "PNG"))
    for channel in range(3):
        np.testing.assert_array_equal(np.asarray(image)[..., channel], np.asarray(gray))


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "GIF"])
def test_one_bit_image_becomes_black_and_white_rgb(fmt: str) -> None:
    bilevel = half_and_half("black", "white").convert("1")
    image = decode_image(encode(bilevel, fmt))
    assert pixels(image)[:, :16].max() == 0
    assert pixels(image)[:, 16:].min() == 255


# --- resources, threads and the contract -------------------------------------------------


def test_no_stream_is_left_open_on_success_or_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[io.BytesIO] = []

    class RecordingBytesIO(io.BytesIO):
        def __init__(self, data: bytes) -> None:
            super().__init__(data)
            opened.append(self)

    monkeypatch.setattr(decode, "BytesIO", RecordingBytesIO)
    for data in [CONVERTIBLE["gif_two_frames"], CONVERTIBLE["webp_two_frames"]]:
        decode_image(data)
    for name in ["png_truncated_half", "png_bad_crc", "gif_frame_grows_to_10000x10000"]:
        code_of(BAD[name][0])
    assert len(opened) == 5
    assert all(stream.closed for stream in opened)


def test_concurrent_decoding_from_many_threads_matches_sequential() -> None:
    inputs = [*CONVERTIBLE.values(), *(data for data, _ in BAD.values())] * 4
    expected = [_outcome(data) for data in inputs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(_outcome, inputs)) == expected


def _outcome(data: bytes) -> object:
    try:
        image = decode_image(data)
    except ImageError as error:
        return error.code
    return image.size, image.tobytes()


def test_decoding_leaves_pillow_globals_and_warning_filters_untouched() -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    for data in [*CONVERTIBLE.values(), *(data for data, _ in BAD.values())]:
        _outcome(data)
    after = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    assert after == before


def test_module_docstring_documents_every_code_and_conversion() -> None:
    doc = decode.__doc__ or ""
    codes = ["EMPTY_SOURCE", "SOURCE_TOO_LARGE", "UNSUPPORTED_FORMAT", "IMAGE_TOO_LARGE"]
    conversions = ["first frame", "EXIF orientation", "I;16", "onto white", "palette P"]
    conversions += ["CMYK", "grayscale L", "1-bit", "TIFF is left out"]
    for phrase in [*codes, "CORRUPT_IMAGE", *conversions]:
        assert phrase in doc
