"""Bytes → a safe, fully loaded RGB image, or an `ImageError` with a stable code.

`decode_image(data, limits)` is the only way the worker turns untrusted bytes into pixels with
Pillow. `check_jpeg(data, limits)` runs the same checks on a JPEG without decoding it, for the
opt-in decoder that hands checked JPEGs to torchvision (`worker/tensor_decode.py`).

Formats
    The format is sniffed from the leading bytes (never from a file name or a content type)
    and must be one of `ALLOWED_FORMATS`: JPEG, PNG, WebP, GIF, BMP. Each is opened by its own
    Pillow plugin, so Pillow never guesses among its ~40 other readers (it would read some
    text files as XBM images and hand EPS files to Ghostscript). TIFF is left out on purpose:
    it is a container for a dozen compressions decoded by libtiff (LZW, Deflate, old-style
    JPEG, JBIG, PackBits, ...), with pages, tiles, BigTIFF offsets and 16-bit, float, CMYK
    and LAB samples, which is a large attack surface for a format web and camera images
    almost never use.

Error codes (`ImageError.code`), in the order they are checked
    EMPTY_SOURCE        the input is zero bytes.
    SOURCE_TOO_LARGE    the input is longer than `limits.max_bytes`; checked before parsing.
    UNSUPPORTED_FORMAT  the input does not start with the signature of an allowed format:
                        text (whatever the file is called), XBM, EPS, TIFF, SVG, PDF, AVIF,
                        HEIC, ICO, ...
    IMAGE_TOO_LARGE     the header declares more than `limits.max_pixels` pixels or a side
                        longer than `limits.max_side`; checked from the header, before any
                        pixel is decoded, so a decompression bomb never allocates its frame.
                        Pillow's own DecompressionBombError/Warning map here too.
    CORRUPT_IMAGE       the signature of an allowed format, but a malformed or truncated
                        header or pixel stream, or a JPEG with more than `MAX_JPEG_SCANS`
                        scans (a CPU bomb: each progressive scan revisits the whole image).

Conversions (the result is always mode "RGB", 8 bits a channel, with an empty `info`)
    - Only the first frame is decoded: an animated GIF or WebP gives its first frame, an
      APNG its default image, a multi-picture JPEG (MPO) its primary image.
    - EXIF orientation (tags 2-8, or tiff:Orientation in XMP) is applied, so the pixels are
      upright; the metadata is dropped, so applying it again downstream is a no-op. An EXIF
      block that cannot be parsed is ignored rather than failing the image.
    - 16-bit grayscale (I;16) keeps its high byte (value >> 8), as Pillow does for 16-bit
      RGB, instead of Pillow's convert(), which clips to 255 and turns such images almost
      white. A tRNS colour on such an image becomes transparency before it is dropped.
    - Alpha (RGBA, LA, PA) and transparency (a palette or colour key, as in GIF and PNG tRNS)
      are composited onto white, exactly as transformers' `convert_to_rgb` (used by
      `CLIPImageProcessor`) does; Pillow's convert("RGB") would instead keep the colour
      hidden under transparent pixels.
    - Everything else goes through Pillow's convert("RGB"): grayscale L and 1-bit copy gray
      into the three channels, palette P looks up its colours, CMYK (incl. Adobe's inverted
      CMYK JPEG) uses Pillow's naive CMYK → RGB. No ICC colour management is done.

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
    WebPImagePlugin,
)

from schemas.errors import ErrorCode, ImageError

# Plugins are called directly, not through Image.open: that keeps the allow-list exact and
# skips Image.open's own bomb check, which only *warns* between 89.5 and 179 megapixels.
# JpegImageFile rather than jpeg_factory: an MPO then opens as its primary JPEG.
_OPENERS: Final[dict[str, Callable[[IO[bytes]], ImageFile.ImageFile]]] = {
    "JPEG": JpegImagePlugin.JpegImageFile,
    "PNG": PngImagePlugin.PngImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
    "GIF": GifImagePlugin.GifImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
}
ALLOWED_FORMATS: Final = tuple(_OPENERS)

# Real encoders write 1 (baseline) to about 10 (progressive) scans per picture.
MAX_JPEG_SCANS: Final = 500
_JPEG_SOS: Final = b"\xff\xda"  # entropy-coded data never holds an unstuffed 0xFF

# "BM" alone starts too much text; the DIB header sizes are the ones Pillow reads.
_BMP_DIB_SIZES: Final = {struct.pack("<I", n) for n in (12, 40, 52, 56, 64, 108, 124)}

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


DEFAULT_LIMITS: Final = ImageLimits()


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, *,
                 draft_side: int | None = None) -> Image.Image:
    """Decode `data` into a new, fully loaded RGB image, or raise `ImageError`.

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
        rgb = _to_rgb(image)
        if orientation in _TRANSPOSE_FOR_ORIENTATION:
            rgb = rgb.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
    rgb.info = {}
    return rgb


def check_jpeg(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> JpegHeader:
    """Every check `decode_image` makes on a JPEG before it decodes a pixel, or `ImageError`.

    The same codes in the same order: the byte limits, the signature, the scan count, then
    the header (parsed by Pillow's JPEG plugin, which reads markers but no entropy-coded
    data) and the size limits on the stored size. The orientation is read as `decode_image`
    reads it (EXIF, or tiff:Orientation in XMP; 1 when the block cannot be parsed).
    """
    with _opened(data, limits) as (fmt, image):
        if fmt != "JPEG":
            raise ImageError("not a JPEG", code=ErrorCode.UNSUPPORTED_FORMAT)
        return JpegHeader(image.size, image.mode, _orientation(image))


@contextmanager
def _opened(data: bytes, limits: ImageLimits) -> Iterator[tuple[str, ImageFile.ImageFile]]:
    """The format and its plugin opened on `data`, after every check that needs no pixels."""
    _check_source(data, limits)
    fmt = _sniff_format(data)
    if fmt is None:
        raise ImageError(
            f"not an image in an allowed format ({', '.join(ALLOWED_FORMATS)})",
            code=ErrorCode.UNSUPPORTED_FORMAT,
        )
    _check_before_parsing(fmt, data, limits)
    with (
        _pil_errors_as_image_errors(fmt),
        BytesIO(data) as stream,
        _OPENERS[fmt](stream) as image,
    ):
        _check_size(image.size, limits)
        yield fmt, image


def is_jpeg(data: bytes) -> bool:
    """Whether `data` starts with a JPEG signature (what `decode_image` sniffs as JPEG)."""
    return _sniff_format(data) == "JPEG"


def _check_source(data: bytes, limits: ImageLimits) -> None:
    if not data:
        raise ImageError("the image is empty (0 bytes)", code=ErrorCode.EMPTY_SOURCE)
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"{len(data)} bytes exceeds the limit of {limits.max_bytes}",
            code=ErrorCode.SOURCE_TOO_LARGE,
        )


def _sniff_format(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:2] == b"BM" and data[14:18] in _BMP_DIB_SIZES:
        return "BMP"
    return None


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


@contextmanager
def _pil_errors_as_image_errors(fmt: str) -> Iterator[None]:
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
        raise ImageError(
            f"the {fmt} data could not be decoded: {exc}", code=ErrorCode.CORRUPT_IMAGE
        ) from exc


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
        return int(value)
    except Exception:  # noqa: BLE001 - a broken EXIF block costs its orientation, not the image
        return 1


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _to_8_bit(image)
    # The same test and the same compositing as transformers' convert_to_rgb.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit gray image as L (or LA if it has a tRNS colour), keeping the high byte."""
    values = np.asarray(image)
    gray = Image.fromarray((np.clip(values, 0, 0xFFFF) >> 8).astype(np.uint8))
    transparent = image.info.get("transparency")
    if transparent is None:
        return gray
    alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8))
    return Image.merge("LA", (gray, alpha))
