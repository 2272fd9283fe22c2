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
    rgba_with_hidden_colour,
    two_frames,
    webp_vp8x_header,
    with_exif_orientation,
)
from worker.decode import ImageLimits, check_jpeg, decode_image
from worker.image_format import ALLOWED_FORMATS

BAD = {name: (data, code) for name, data, code in bad_image_corpus()}
CONVERTIBLE = dict(convertible_image_corpus())
WHITE = (255, 255, 255)
IMAGE_CODES = {ErrorCode.EMPTY_SOURCE, ErrorCode.NOT_AN_IMAGE, ErrorCode.UNSUPPORTED_FORMAT,
               ErrorCode.TRUNCATED_IMAGE, ErrorCode.CORRUPT_IMAGE, ErrorCode.IMAGE_TOO_LARGE,
               ErrorCode.BAD_GEOMETRY}


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
    assert len(BAD) >= 60
    assert len(CONVERTIBLE) >= 30
    assert {code for _, code in BAD.values()} == IMAGE_CODES
    for code in IMAGE_CODES - {ErrorCode.EMPTY_SOURCE}:
        assert sum(expected == code for _, expected in BAD.values()) >= 4, code


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_refusal_has_a_message_that_says_why(name: str) -> None:
    data, expected = BAD[name]
    with pytest.raises(ImageError) as raised:
        decode_image(data)
    assert raised.value.code == expected
    assert len(raised.value.message) > 20
    assert str(raised.value).startswith(f"[{expected}] ")


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


@pytest.mark.parametrize("name", ["text_named_jpg", "html", "html_with_inline_svg", "json",
                                  "random_bytes", "riff_wave_audio", "mp4_video"])
def test_text_html_and_random_bytes_are_not_an_image(name: str) -> None:
    assert code_of(BAD[name][0]) == ErrorCode.NOT_AN_IMAGE


@pytest.mark.parametrize("name", ["xbm_text", "eps_text", "ico", "tga", "pcx", "ppm"])
def test_formats_pillow_would_open_are_unsupported_format(name: str) -> None:
    data = BAD[name][0]
    with Image.open(io.BytesIO(data)):  # the trap: Pillow itself would happily read these
        pass
    assert code_of(data) == ErrorCode.UNSUPPORTED_FORMAT


def test_unsupported_format_names_the_format_it_recognised() -> None:
    for name, fmt in [("svg_with_prolog", "SVG"), ("heic_header", "HEIF/AVIF"), ("ico", "ICO")]:
        with pytest.raises(ImageError, match=fmt):
            decode_image(BAD[name][0])


def test_allow_list_is_exactly_jpeg_png_webp_gif_bmp_tiff() -> None:
    assert decode.ALLOWED_FORMATS == ALLOWED_FORMATS == ("JPEG", "PNG", "WEBP", "GIF", "BMP",
                                                         "TIFF")
    assert tuple(decode._OPENERS) == ALLOWED_FORMATS


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


@pytest.mark.parametrize("name", ["jpeg_rgb", "jpeg_progressive", "png_rgb", "webp_lossy",
                                  "webp_lossless_rgba", "gif", "bmp_rgb", "tiff_rgb", "tiff_lzw",
                                  "tiff_deflate", "tiff_jpeg", "bigtiff"])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.75])
def test_a_cut_file_in_every_allowed_format_is_truncated(name: str, fraction: float) -> None:
    data = CONVERTIBLE[name]
    assert code_of(data[: int(len(data) * fraction)]) == ErrorCode.TRUNCATED_IMAGE


def test_a_jpeg_cut_right_after_its_first_marker_is_truncated_not_unsupported() -> None:
    assert code_of(CONVERTIBLE["jpeg_rgb"][:2]) == ErrorCode.TRUNCATED_IMAGE


@pytest.mark.parametrize("name", ["jpeg_rgb", "png_rgb", "webp_lossless_rgba", "gif", "bmp_rgb",
                                  "tiff_deflate"])
def test_every_cut_of_a_file_is_truncated_or_decodes(name: str) -> None:
    data = CONVERTIBLE[name]
    for cut in range(18, len(data), max(1, len(data) // 150)):  # past every signature
        try:
            decode_image(data[:cut])
        except ImageError as error:
            assert error.code == ErrorCode.TRUNCATED_IMAGE, (cut, error)


def test_truncated_images_are_not_loaded_and_the_global_flag_stays_off() -> None:
    data = CONVERTIBLE["jpeg_rgb"]
    assert code_of(data[:-100]) == ErrorCode.TRUNCATED_IMAGE
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
    signatures = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBP", b"GIF89a", b"BM",
                  b"II*\0", b"MM\0*", b"II+\0\x08\0\0\0"]
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


def test_16_bit_grayscale_is_clipped_as_the_references_convert_it() -> None:
    values = np.array([[0, 200, 255, 256, 0x7FFF, 0xFFFF]], dtype=np.uint16)
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    image = decode_image(encode(source, "PNG"))
    assert pixels(image)[0, :, 0].tolist() == [0, 200, 255, 255, 255, 255]
    assert (pixels(image)[..., 0] == pixels(image)[..., 2]).all()


def test_16_bit_grayscale_colour_key_is_ignored_by_default_and_composited_on_request() -> None:
    values = np.array([[100, 0x4000, 30]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG", transparency=100)
    assert pixels(decode_image(data))[0, :, 0].tolist() == [100, 255, 30]
    assert pixels(decode_image(data, background=(0, 0, 200)))[0].tolist() == [
        [0, 0, 200], [255, 255, 255], [30, 30, 30]]


def test_palette_image_converts_through_its_palette() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0])
    palette.putpixel((1, 0), 1)
    image = decode_image(encode(palette, "PNG"))
    assert pixels(image)[0].tolist() == [[10, 20, 30], [200, 100, 0]]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_keeps_the_palette_colour_unless_a_background_is_set(fmt: str) -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])  # index 0 red (transparent), 1 blue
    palette.putpixel((1, 0), 1)
    data = encode(palette, fmt, transparency=0)
    assert pixels(decode_image(data))[0].tolist() == [[255, 0, 0], [0, 0, 255]]
    assert pixels(decode_image(data, background=WHITE))[0].tolist() == [[255, 255, 255],
                                                                        [0, 0, 255]]


def test_a_palette_alpha_table_is_dropped_without_a_warning() -> None:
    # Pillow's convert("RGB") warns about such a table; pytest makes that warning an error.
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    data = encode(palette, "PNG", transparency=b"\x00\x80")
    assert pixels(decode_image(data))[0].tolist() == [[255, 0, 0], [0, 0, 255]]
    assert pixels(decode_image(data, background=(0, 0, 0)))[0].tolist() == [[0, 0, 0],
                                                                             [0, 0, 128]]


def test_rgba_keeps_the_colour_under_transparent_pixels_as_convert_rgb_does() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    image = decode_image(encode(rgba, "PNG"))
    assert pixels(image)[0].tolist() == [[255, 0, 0], [0, 0, 255], [0, 0, 0]]


def test_rgba_is_composited_onto_the_background_when_one_is_set() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    on_white = decode_image(encode(rgba, "PNG"), background=WHITE)
    assert pixels(on_white)[0].tolist() == [[255, 255, 255], [0, 0, 255], [127, 127, 127]]
    on_green = decode_image(encode(rgba, "PNG"), background=(0, 255, 0))
    assert pixels(on_green)[0].tolist() == [[0, 255, 0], [0, 0, 255], [0, 127, 0]]


@pytest.mark.parametrize("background", [None, WHITE])
def test_la_drops_alpha_or_composites_it(background: tuple[int, int, int] | None) -> None:
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (40, 255)])
    image = decode_image(encode(la, "PNG"), background=background)
    first = [255, 255, 255] if background else [0, 0, 0]
    assert pixels(image)[0].tolist() == [first, [40, 40, 40]]


def test_pa_drops_alpha_or_composites_it() -> None:
    # No allowed format decodes to PA today; this pins the conversion should one start to.
    pa = Image.new("PA", (2, 1))
    pa.putpalette([0, 255, 0, 0, 0, 0])
    pa.putdata([(0, 0), (0, 255)])
    assert pixels(decode._to_rgb(pa, None))[0].tolist() == [[0, 255, 0], [0, 255, 0]]
    assert pixels(decode._to_rgb(pa, WHITE))[0].tolist() == [[255, 255, 255], [0, 255, 0]]


def test_every_conversion_matches_transformers_load_image() -> None:
    """`load_image` is `exif_transpose(image).convert("RGB")`: the pixels ALIGN's and AltCLIP's
    reference pipeline sees (open_clip's users write the same convert, without the rotation)."""
    image_utils = pytest.importorskip("transformers.image_utils")
    for name, data in CONVERTIBLE.items():
        with Image.open(io.BytesIO(data)) as source, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about palette alpha tables
            expected = np.asarray(image_utils.load_image(source))
        np.testing.assert_array_equal(np.asarray(decode_image(data)), expected, err_msg=name)


def test_a_white_background_matches_transformers_convert_to_rgb() -> None:
    """With `background` white every conversion is what CLIPImageProcessor's own convert_to_rgb
    makes of the upright image: alpha and transparency composited onto white."""
    image_transforms = pytest.importorskip("transformers.image_transforms")
    for name, data in CONVERTIBLE.items():
        with Image.open(io.BytesIO(data)) as source:
            upright = ImageOps.exif_transpose(source)
            expected = image_transforms.convert_to_rgb(upright, return_numpy=True)
        np.testing.assert_array_equal(np.asarray(decode_image(data, background=WHITE)),
                                      expected, err_msg=name)


def test_the_hidden_colour_case_differs_between_the_default_and_a_background() -> None:
    data = encode(rgba_with_hidden_colour(), "PNG")
    dropped, white = pixels(decode_image(data)), pixels(decode_image(data, background=WHITE))
    assert (white[12:, :32] == 255).all()  # the transparent half
    assert dropped[12:, :32].std() > 20  # the gradient stored under it
    np.testing.assert_array_equal(dropped[12:, 32:], white[12:, 32:])  # opaque pixels agree


# --- TIFF --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiff_rgb", "tiff_lzw", "tiff_deflate", "tiff_jpeg", "bigtiff",
                                  "tiff_rgba", "tiff_cmyk", "tiff_16bit_gray"])
def test_tiff_decodes_like_pillow_opens_it(name: str) -> None:
    data = CONVERTIBLE[name]
    with Image.open(io.BytesIO(data)) as source:
        expected = np.asarray(source.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(decode_image(data)), expected)


def test_a_multi_page_tiff_gives_its_first_page() -> None:
    data = two_frames("TIFF", "red", "blue")
    with Image.open(io.BytesIO(data)) as source:
        assert source.n_frames == 2
    image = decode_image(data)
    assert image.size == (16, 16)
    assert (pixels(image) == (255, 0, 0)).all()


def test_a_multi_page_tiff_is_limited_by_its_first_page_only() -> None:
    big_second = [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (200, 200), "blue")]
    data = encode(big_second[0], "TIFF", save_all=True, append_images=big_second[1:])
    assert decode_image(data, ImageLimits(max_pixels=64)).size == (8, 8)
    assert code_of(two_frames("TIFF"), ImageLimits(max_pixels=255)) == ErrorCode.IMAGE_TOO_LARGE


def test_tiff_exif_orientation_is_applied() -> None:
    data = CONVERTIBLE["tiff_exif_orientation_6"]
    with Image.open(io.BytesIO(data)) as source:
        expected = np.asarray(ImageOps.exif_transpose(source).convert("RGB"))
    assert decode_image(data).size == (48, 64)
    np.testing.assert_array_equal(np.asarray(decode_image(data)), expected)


def test_tiff_size_is_checked_from_the_header_before_decoding() -> None:
    assert code_of(BAD["tiff_claims_30000x30000"][0]) == ErrorCode.IMAGE_TOO_LARGE


# --- geometry ----------------------------------------------------------------------------


def test_one_side_at_most_100_times_the_other_is_accepted() -> None:
    assert decode.DEFAULT_LIMITS.max_aspect_ratio == 100
    for size in [(1, 100), (100, 1), (200, 20_000), (20_000, 200)]:
        assert decode_image(encode(Image.new("L", size), "PNG")).size == size


@pytest.mark.parametrize("size", [(1, 101), (101, 1), (1, 10_000), (10_000, 1), (199, 20_000)])
def test_a_thinner_image_is_bad_geometry(size: tuple[int, int]) -> None:
    assert code_of(encode(Image.new("L", size), "PNG")) == ErrorCode.BAD_GEOMETRY


def test_geometry_is_checked_from_the_header_for_jpegs_too() -> None:
    data = encode(gradient((10, 1011)), "JPEG")
    with pytest.raises(ImageError) as raised:
        check_jpeg(data)
    assert raised.value.code == ErrorCode.BAD_GEOMETRY
    assert "1011" in raised.value.message


def test_size_limits_come_before_geometry() -> None:
    assert code_of(BAD["png_side_30000x1"][0]) == ErrorCode.IMAGE_TOO_LARGE


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
    codes = [code.name for code in IMAGE_CODES] + ["SOURCE_TOO_LARGE"]
    conversions = ["first frame", "EXIF orientation", "I;16", "alpha", "palette P", "CMYK"]
    conversions += ["grayscale L", "1-bit", "first page", "load_image", 'convert("RGB")']
    conversions += ["image_background", "1:100"]
    for phrase in [*codes, *conversions]:
        assert phrase in doc, phrase
