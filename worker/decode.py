"""Bytes → a safe, fully loaded RGB image, or an `ImageError` with a stable code.

`decode_image(data, limits)` is the only way the worker turns untrusted bytes into pixels with
Pillow. `check_jpeg(data, limits)` runs the same checks on a JPEG without decoding it, for the
opt-in decoder that hands checked JPEGs to torchvision (`worker/tensor_decode.py`).

Formats
    The format is read from the leading bytes (`worker/image_format.py`) and must be one of
    `ALLOWED_FORMATS`: JPEG, PNG, WebP, GIF, BMP, TIFF. Each is opened by its own Pillow
    plugin, so Pillow never guesses among its ~40 other readers (it would read some text files
    as XBM images and hand EPS files to Ghostscript). A TIFF gives its first page (directory)
    only, under the same limits as any other image; its compressions are libtiff's.

Error codes (`ImageError.code`), in the order they are checked
    EMPTY_SOURCE        the input is zero bytes.
    SOURCE_TOO_LARGE    the input is longer than `limits.max_bytes`; checked before parsing.
    NOT_AN_IMAGE        no image format's signature: text (whatever the file is called), HTML,
                        PDF, an archive, random bytes.
    UNSUPPORTED_FORMAT  the signature of an image format outside the allow-list (ICO, PSD,
                        JPEG 2000, JPEG XL, HEIF/AVIF, SVG, EPS, XBM, PNM, PCX, TGA, ...), or
                        a colour mode Pillow cannot turn into RGB.
    IMAGE_TOO_LARGE     the header declares more than `limits.max_pixels` pixels or a side
                        longer than `limits.max_side`; checked from the header, before any
                        pixel is decoded, so a decompression bomb never allocates its frame.
                        Pillow's own DecompressionBombError/Warning map here too.
    BAD_GEOMETRY        one side is more than `limits.max_aspect_ratio` (100) times the other;
                        checked from the header. This bounds every family's preprocessing: a
                        shortest-side resize to S pixels (OpenCLIP, AltCLIP) makes at most
                        S × 100·S pixels (224: 5 MP, 15 MB as uint8), where a 1×10,000 image
                        would make 224×2,240,000 (1.5 GB, 16 s); ALIGN resizes to a fixed
                        square whatever the shape. At 1:100 a centre crop keeps a hundredth
                        of the image: past that no sensible model input can be made.
    TRUNCATED_IMAGE     an allowed format whose data ends before its own structure does (a
                        cut download, a JPEG that stops after its first marker), found when
                        the header or pixels cannot be decoded (`image_format.ends_early`).
    CORRUPT_IMAGE       an allowed format that is complete but malformed: a bad header, CRC or
                        pixel stream, or a JPEG with more than `MAX_JPEG_SCANS` scans (a CPU
                        bomb: each progressive scan revisits the whole image).

Conversions (the result is always mode "RGB", 8 bits a channel, with an empty `info`)
    By default every family gets the pixels its reference pipeline gets. transformers'
    `load_image` (what `pipeline(...)` calls before ALIGN's and AltCLIP's processors) is
    `ImageOps.exif_transpose(image).convert("RGB")`, and open_clip users write
    `Image.open(path).convert("RGB")` (open_clip's transform converts the same way). So:
    - Only the first frame is decoded: an animated GIF or WebP gives its first frame, an
      APNG its default image, a multi-picture JPEG (MPO) its primary image, a TIFF its
      first page.
    - EXIF orientation (tags 2-8, or tiff:Orientation in XMP) is applied, so the pixels are
      upright, as `load_image` does; the metadata is dropped, so applying it again downstream
      is a no-op. An EXIF block that cannot be parsed is ignored rather than failing the
      image. (open_clip's own recipe does not rotate; the worker does, for every family.)
    - The rest is Pillow's convert("RGB"): alpha (RGBA, LA, PA) is dropped, keeping the colour
      stored under transparent pixels; palette P looks up its colours and ignores its
      transparency (palette tRNS, a GIF's transparent index); grayscale L and 1-bit copy gray
      into the three channels; CMYK (incl. Adobe's inverted CMYK JPEG) uses Pillow's naive
      CMYK → RGB; 16-bit grayscale (I;16), 32-bit I and float F are clipped to 0-255, which
      turns most 16-bit images almost white, exactly as in the references. 16-bit RGB(A)
      keeps its high byte (Pillow's reader). No ICC colour management is done.
    - Opt-in (`image_background`, `background=`): alpha and transparency are composited onto
      that colour instead, the way transformers' `convert_to_rgb` composites onto white
      (`alpha_composite`); opaque pixels are those of the default conversion.

Thread safety: each call works on its own objects and only reads Pillow's globals; it never
sets `Image.MAX_IMAGE_PIXELS`, `ImageFile.LOAD_TRUNCATED_IMAGES` or the warnings filters.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from typing import IO, Final

import numpy as np
from PIL import (
    BmpImagePlugin,
    ExifTags,
    GifImagePlugin,
    Image,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from schemas.errors import ErrorCode, ImageError
from worker.image_format import ALLOWED_FORMATS, ends_early, identify

RGB = tuple[int, int, int]

# Plugins are called directly, not through Image.open: that keeps the allow-list exact and
# skips Image.open's own bomb check, which only *warns* between 89.5 and 179 megapixels.
# JpegImageFile rather than jpeg_factory: an MPO then opens as its primary JPEG.
_OPENERS: Final[dict[str, Callable[[IO[bytes]], ImageFile.ImageFile]]] = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
    "GIF": GifImagePlugin.GifImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,
}
assert tuple(_OPENERS) == ALLOWED_FORMATS

# Real encoders write 1 (baseline) to about 10 (progressive) scans per picture.
MAX_JPEG_SCANS: Final = 500
_JPEG_SOS: Final = b"\xff\xda"  # entropy-coded data never holds an unstuffed 0xFF

_SIXTEEN_BIT_MODES: Final = {"I;16", "I;16B", "I;16L", "I;16N", "I"}

_TRANSPOSE_FOR_ORIENTATION: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class JpegHeader:
    """What `check_jpeg` read from a JPEG's header: stored size, Pillow's mode, EXIF orientation."""

    size: tuple[int, int]
    mode: str
    orientation: int


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one input. Above Pillow's own ceiling (~179 MP) GIF and WebP stay capped."""

    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 20_000
    max_aspect_ratio: int = 100  # long side / short side; see BAD_GEOMETRY above


DEFAULT_LIMITS: Final = ImageLimits()


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, *,
                 draft_side: int | None = None, background: RGB | None = None) -> Image.Image:
    """Decode `data` into a new, fully loaded RGB image, or raise `ImageError`.

    With `background`, alpha and transparency are composited onto that colour instead of
    being dropped as the reference pipelines drop them.

    With `draft_side`, a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain where
    both sides stay at least `draft_side` pixels long (libjpeg's scaled decoding): a fraction
    of the work, and a slightly different picture from a full decode followed by a resize.
    Other formats are unaffected. The limits apply to the stored size, before scaling.
    """
    with _opened(data, limits) as (fmt, image):
        if draft_side is not None and fmt == "JPEG":
            image.draft(None, (draft_side, draft_side))
        image.load()
        orientation = _orientation(image)
        rgb = _to_rgb(image, background)
        if orientation in _TRANSPOSE_FOR_ORIENTATION:
            rgb = rgb.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
    rgb.info = {}
    return rgb


def check_jpeg(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> JpegHeader:
    """Every check `decode_image` makes on a JPEG before it decodes a pixel, or `ImageError`.

    The same codes in the same order: the byte limits, the signature, the scan count, then
    the header (parsed by Pillow's JPEG plugin, which reads markers but no entropy-coded
    data), the size limits and the aspect ratio on the stored size. The orientation is read
    as `decode_image` reads it (EXIF, or tiff:Orientation in XMP; 1 when the block cannot be
    parsed).
    """
    with _opened(data, limits) as (fmt, image):
        if fmt != "JPEG":
            raise ImageError("not a JPEG", code=ErrorCode.UNSUPPORTED_FORMAT)
        return JpegHeader(image.size, image.mode, _orientation(image))


@contextmanager
def _opened(data: bytes, limits: ImageLimits) -> Iterator[tuple[str, ImageFile.ImageFile]]:
    """The format and its plugin opened on `data`, after every check that needs no pixels."""
    _check_source(data, limits)
    fmt = identify(data)
    _check_before_parsing(fmt, data, limits)
    with (
        _pil_errors_as_image_errors(fmt, data),
        BytesIO(data) as stream,
        _OPENERS[fmt](stream) as image,
    ):
        _check_size(image.size, limits)
        _check_geometry(image.size, limits)
        yield fmt, image


def is_jpeg(data: bytes) -> bool:
    """Whether `data` starts with a JPEG signature (what `decode_image` takes for a JPEG)."""
    try:
        return identify(data) == "JPEG"
    except ImageError:
        return False


def _check_source(data: bytes, limits: ImageLimits) -> None:
    if not data:
        raise ImageError("the image is empty (0 bytes)", code=ErrorCode.EMPTY_SOURCE)
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"{len(data)} bytes exceeds the limit of {limits.max_bytes}",
            code=ErrorCode.SOURCE_TOO_LARGE,
        )


def _check_before_parsing(fmt: str, data: bytes, limits: ImageLimits) -> None:
    # libwebp allocates the whole canvas as soon as its decoder is created, before any
    # Python code could look at the size, so WebP's size is read from the bytes here.
    if fmt == "WEBP" and (size := _webp_canvas_size(data)) is not None:
        _check_size(size, limits)
    if fmt == "JPEG" and (scans := data.count(_JPEG_SOS)) > MAX_JPEG_SCANS:
        raise ImageError(
            f"the JPEG has {scans} scans, more than {MAX_JPEG_SCANS}",
            code=ErrorCode.CORRUPT_IMAGE,
        )


def _webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first chunk of a WebP file, or None if it is unreadable."""
    fourcc, payload = data[12:16], data[20:30]
    if len(payload) < 10:
        return None
    if fourcc == b"VP8X":
        return _u24(payload[4:7]) + 1, _u24(payload[7:10]) + 1
    if fourcc == b"VP8L" and payload[0] == 0x2F:
        bits = int.from_bytes(payload[1:5], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if fourcc == b"VP8 " and payload[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", payload[6:10])
        return width & 0x3FFF, height & 0x3FFF
    return None


def _u24(three: bytes) -> int:
    return int.from_bytes(three, "little")


def _check_size(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width * height > limits.max_pixels or max(width, height) > limits.max_side:
        raise ImageError(
            f"{width}x{height} exceeds the limits of {limits.max_pixels} pixels"
            f" and {limits.max_side} per side",
            code=ErrorCode.IMAGE_TOO_LARGE,
        )


def _check_geometry(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if max(width, height) > limits.max_aspect_ratio * max(min(width, height), 1):
        raise ImageError(
            f"{width}x{height}: one side is more than {limits.max_aspect_ratio} times the other,"
            " too thin to make a model input from",
            code=ErrorCode.BAD_GEOMETRY,
        )


@contextmanager
def _pil_errors_as_image_errors(fmt: str, data: bytes) -> Iterator[None]:
    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{fmt}: {exc}", code=ErrorCode.IMAGE_TOO_LARGE) from exc
    except MemoryError:
        raise  # within the limits this is the worker running short, not a bad image
    except Exception as exc:
        # Pillow's plugins raise a wide, undocumented set on malformed input (OSError,
        # SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error, ...),
        # and its warnings are exceptions where warnings are errors.
        if ends_early(fmt, data):
            raise ImageError(f"the {fmt} file ends early ({len(data)} bytes): it is cut off"
                             f" ({exc})", code=ErrorCode.TRUNCATED_IMAGE) from exc
        raise ImageError(
            f"the {fmt} data could not be decoded: {exc}", code=ErrorCode.CORRUPT_IMAGE
        ) from exc


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
        return int(value)
    except Exception:  # noqa: BLE001 - a broken EXIF block costs its orientation, not the image
        return 1


def _to_rgb(image: Image.Image, background: RGB | None) -> Image.Image:
    alpha = None if background is None else _alpha(image)
    rgb = _reference_rgb(image)
    if alpha is None or background is None:
        return rgb
    rgba = rgb.convert("RGBA")
    rgba.putalpha(alpha)
    # The same compositing as transformers' convert_to_rgb, onto `background`.
    base = Image.new("RGBA", rgb.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def _reference_rgb(image: Image.Image) -> Image.Image:
    """Pillow's convert("RGB"), as transformers' load_image and open_clip's users call it."""
    if isinstance(image.info.get("transparency"), bytes):
        # convert() ignores a palette's alpha table either way; dropped first, it only does
        # so without warning that it does.
        del image.info["transparency"]
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageError(f"{image.mode} images cannot be converted to RGB: {exc}",
                         code=ErrorCode.UNSUPPORTED_FORMAT) from exc


def _alpha(image: Image.Image) -> Image.Image | None:
    """The image's opacity as an L image, or None where it is opaque."""
    transparent = image.info.get("transparency")
    if image.mode in _SIXTEEN_BIT_MODES and transparent is not None:
        # Pillow compares a 16-bit colour key after clipping to 8 bits: compare it here.
        return Image.fromarray(np.where(np.asarray(image) == transparent, 0, 255).astype(np.uint8))
    bands = image.getbands()
    if "A" in bands or "a" in bands or transparent is not None:
        return image.convert("RGBA").getchannel("A")
    return None
