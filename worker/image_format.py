"""What some bytes are, read from the bytes themselves: never from a file name or a content type.

`identify(data)` names the allowed format `data` starts with (`ALLOWED_FORMATS`), or raises
`ImageError`:
    UNSUPPORTED_FORMAT  the signature of an image format we do not decode (`OTHER_FORMATS`:
                        ICO, PSD, JPEG 2000, JPEG XL, HEIF/AVIF, SVG, EPS, XBM, PNM, PCX, TGA, ...)
    NOT_AN_IMAGE        no image format's signature at all: text, HTML, PDF, an archive, random
                        bytes.
A JPEG cut right after its start-of-image marker (FF D8) and a PNG or GIF cut inside its
signature are still that format: they are truncated files, and `ends_early` says so.

`ends_early(fmt, data)` tells a truncated file from a corrupt one, after a decoder failed on it:
whether the file stops before its own structure says it ends. JPEG: no end-of-image marker
after its last scan; PNG: no IEND chunk; GIF: its blocks run out before the trailer; WebP:
shorter than its RIFF size; BMP: shorter than its declared file size; TIFF: its first
directory, a value it points to, or a strip or tile of it lies past the end. It reads the
structure, not the decoder's message, so the answer does not change with the Pillow version
or the warnings filter. A complete file that fails is corrupt, whatever the decoder says.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import Final

from schemas.errors import ErrorCode, ImageError

ALLOWED_FORMATS: Final = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

_PNG: Final = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI: Final = b"\xff\xd8"
# "BM" alone starts too much text; the DIB header sizes are the ones Pillow reads.
_BMP_DIB_SIZES: Final = {struct.pack("<I", n) for n in (12, 40, 52, 56, 64, 108, 124)}
_TIFF: Final = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF

# Image formats recognised only to say so: each pattern is matched at the start of the data.
OTHER_FORMATS: Final = tuple((name, re.compile(pattern, re.DOTALL)) for name, pattern in (
    ("ICO", rb"\x00\x00[\x01\x02]\x00"),
    ("PSD", rb"8BPS"),
    ("JPEG 2000", rb"\x00\x00\x00\x0cjP  |\xff\x4f\xff\x51"),
    ("JPEG XL", rb"\xff\x0a|\x00\x00\x00\x0cJXL "),
    ("HEIF/AVIF", rb".{4}ftyp(avif|avis|heic|heix|hevc|hevx|heim|heis|mif1|msf1)"),
    ("SVG", rb"(\xef\xbb\xbf)?\s*(<\?xml[^>]*>\s*)?(<!--.*?-->\s*|<!DOCTYPE svg[^>]*>\s*)*<svg\b"),
    ("EPS", rb"%!PS-Adobe-\d\.\d EPSF|\xc5\xd0\xd3\xc6"),
    ("XBM", rb"\s*#define\s+\w*_width\s+\d"),
    ("XPM", rb"/\* XPM \*/"),
    ("PNM", rb"P[1-7]\s+[#0-9]|P[Ff]\s"),
    ("PCX", rb"\x0a[\x00\x02\x03\x04\x05]\x01"),
    ("QOI", rb"qoif"),
    ("DDS", rb"DDS "),
    ("OpenEXR", rb"v/1\x01"),
    ("Radiance HDR", rb"#\?(RADIANCE|RGBE)"),
    ("GIMP XCF", rb"gimp xcf"),
    ("ICNS", rb"icns"),
    ("SGI", rb"\x01\xda"),
    ("FITS", rb"SIMPLE  ="),
    ("WMF/EMF", rb"\xd7\xcd\xc6\x9a|.{40} EMF"),
    ("DICOM", rb".{128}DICM"),
))
_TGA_FOOTER: Final = b"TRUEVISION-XFILE.\x00"  # TGA has no leading signature


def identify(data: bytes) -> str:
    """The allowed format `data` is in, or `ImageError` (UNSUPPORTED_FORMAT, NOT_AN_IMAGE)."""
    fmt = _allowed_format(data)
    if fmt is not None:
        return fmt
    other = _other_format(data)
    if other is not None:
        raise ImageError(f"{other} images are not supported (supported: "
                         f"{', '.join(ALLOWED_FORMATS)})", code=ErrorCode.UNSUPPORTED_FORMAT)
    raise ImageError(f"not an image: no image format starts with {data[:8]!r}",
                     code=ErrorCode.NOT_AN_IMAGE)


def _allowed_format(data: bytes) -> str | None:
    if data[:3] == _JPEG_SOI + b"\xff" or data == _JPEG_SOI:
        return "JPEG"
    if data[:8] == _PNG or (4 <= len(data) < 8 and _PNG.startswith(data)):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a") or data in (b"GIF8", b"GIF87", b"GIF89"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and data[14:18] in _BMP_DIB_SIZES:
        return "BMP"
    if data[:4] in _TIFF:
        return "TIFF"
    return None


def _other_format(data: bytes) -> str | None:
    head = data[:1024]
    for name, pattern in OTHER_FORMATS:
        if pattern.match(head):
            return name
    return "TGA" if data.endswith(_TGA_FOOTER) else None


def ends_early(fmt: str, data: bytes) -> bool:
    """Whether `data`, in the allowed format `fmt`, stops before its structure says it ends."""
    return _ENDS_EARLY[fmt](data)


def _jpeg_ends_early(data: bytes) -> bool:
    last_scan = data.rfind(b"\xff\xda")
    return last_scan < 0 or data.find(b"\xff\xd9", last_scan) < 0


def _gif_ends_early(data: bytes) -> bool:
    """Whether the GIF's blocks run out before its trailer (";")."""
    at = 13 + _gif_colour_table_size(data, 10)
    while at < len(data):
        kind = data[at]
        if kind == 0x3B:  # the trailer
            return False
        if kind == 0x21:  # an extension: its label, then sub-blocks
            at = _after_gif_sub_blocks(data, at + 2)
        elif kind == 0x2C:  # an image: descriptor, colour table, LZW code size, sub-blocks
            at = _after_gif_sub_blocks(data, at + 11 + _gif_colour_table_size(data, at + 9))
        else:
            return False  # not a block: the data is corrupt where it is, not cut
    return True


def _gif_colour_table_size(data: bytes, flags_at: int) -> int:
    flags = data[flags_at] if flags_at < len(data) else 0
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0


def _after_gif_sub_blocks(data: bytes, at: int) -> int:
    while at < len(data) and data[at]:
        at += data[at] + 1
    return at + 1


def _declared_length(data: bytes, start: int, size: int) -> int:
    return int.from_bytes(data[start:start + size], "little") if len(data) >= start + size else -1


_ENDS_EARLY: Final[dict[str, Callable[[bytes], bool]]] = {
    "JPEG": _jpeg_ends_early,
    "PNG": lambda data: b"IEND" not in data,
    "GIF": lambda data: _gif_ends_early(data),
    "WEBP": lambda data: len(data) < 8 + _declared_length(data, 4, 4) or len(data) < 12,
    "BMP": lambda data: len(data) < _declared_length(data, 2, 4) or len(data) < 14,
    "TIFF": lambda data: _tiff_ends_early(data),
}

# Strip (273, 279) and tile (324, 325) offsets and byte counts.
_TIFF_EXTENTS: Final = ((273, 279), (324, 325))
# struct codes of the TIFF value types 1-18, sized as TIFF sizes them (a RATIONAL is 8 bytes).
_TIFF_TYPES: Final = dict(enumerate("BBHIQbBhiqfdI", start=1)) | {16: "Q", 17: "q", 18: "Q"}
_TIFF_MAX_ENTRIES: Final = 4096


def _tiff_ends_early(data: bytes) -> bool:
    """Whether the first directory, a value it points to, or a strip or tile of it lies past
    the end."""
    try:
        tags, value_ends = _tiff_first_directory(data)
    except (struct.error, OverflowError):  # the header or the directory is cut, or lies
        return True  # further out than any file could reach
    ends = [offset + count for offsets, counts in _TIFF_EXTENTS
            for offset, count in zip(tags.get(offsets, ()), tags.get(counts, ()), strict=False)]
    return max(ends + value_ends, default=0) > len(data)


def _tiff_first_directory(data: bytes) -> tuple[dict[int, tuple[int, ...]], list[int]]:
    """A TIFF's first directory: its strip and tile tags, and where each value stored outside
    the directory ends; `struct.error` where the directory is cut (`OverflowError` where an
    offset is past any length)."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    word, count_format, entry_size, inline = ("Q", "Q", 20, 8) if big else ("I", "H", 12, 4)
    (directory,) = struct.unpack_from(order + word, data, 8 if big else 4)
    (entries,) = struct.unpack_from(order + count_format, data, directory)
    first = directory + struct.calcsize(count_format)
    wanted = {tag for pair in _TIFF_EXTENTS for tag in pair}
    tags: dict[int, tuple[int, ...]] = {}
    value_ends: list[int] = []
    for i in range(min(entries, _TIFF_MAX_ENTRIES)):
        entry = first + i * entry_size
        tag, kind, count = struct.unpack_from(order + "HH" + word, data, entry)
        value_type = _TIFF_TYPES.get(kind)
        if value_type is None:
            continue
        at, size = entry + entry_size - inline, struct.calcsize(value_type) * count
        if size > inline:
            (at,) = struct.unpack_from(order + word, data, at)
            value_ends.append(at + size)
        if tag in wanted and kind in (3, 4, 16):  # SHORT, LONG, LONG8
            tags[tag] = struct.unpack_from(f"{order}{count}{value_type}", data, at)
    return tags, value_ends
