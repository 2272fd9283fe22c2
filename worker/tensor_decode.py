"""JPEG batches decoded and preprocessed as tensors on the model's device (`image_decoder="torch"`).

On a GPU, decoding and resizing JPEGs on the CPU is what limits throughput. With this decoder
the prepare threads only fetch and check (`check_jpeg`: the same limits, bomb checks and error
codes as `decode_image`, read from the header without decoding), and the model thread turns
each batch's JPEGs into model input in one go: `torchvision.io.decode_jpeg` on the model's
device (batched nvJPEG on CUDA, libjpeg-turbo on the CPU), the orientation `decode_image`
would apply, then the family's own preprocessing on tensors (`Encoder.tensor_preprocess`).

What goes which way
    - Only JPEGs whose header says YCbCr or grayscale (Pillow modes RGB and L) are decoded by
      torchvision. CMYK and YCCK JPEGs, every other format, and any JPEG torchvision fails on
      (corrupt or truncated data, 12-bit or arithmetic coding, running out of GPU memory) go
      through `decode_image` and `preprocess_image`, so they succeed or fail with exactly the
      code the Pillow decoder gives them. `try_pixels` leaves those to the caller (the
      pipeline hands them back to its prepare threads, so Pillow never holds up the device);
      `pixels` runs Pillow itself, on the calling thread.
    - The orientation is the one Pillow reads (EXIF, or tiff:Orientation in XMP, which
      torchvision's own EXIF handling does not read), applied with tensor flips/transposes.
    - `jpeg_draft` (Pillow's scaled decoding) does not apply here: JPEGs decoded here, and
      those handed back to Pillow after torchvision failed on them, are decoded whole.

What comes out
    On the CPU, torchvision's and Pillow's libjpeg-turbo decode the same pixels. ALIGN and
    AltCLIP preprocess with transformers' torchvision backend either way, so their inputs are
    identical; OpenCLIP's resize of a tensor is within about one grey level of Pillow's
    (embedding cosine ≥ 0.9999 against the Pillow path). nvJPEG on a GPU may round its
    inverse DCT and chroma upsampling differently from libjpeg-turbo.

torchvision 0.29 deprecates its image decoders in favour of TorchCodec (a DeprecationWarning,
ignored by default); TorchCodec's nvJPEG decoder is the place to move to once it is pinned here.

Decoded frames are held only one chunk at a time: a chunk holds at most
`DECODE_CHUNK_PIXELS` stored pixels (or one image), so a batch of large photos never puts all
its full-size frames on the device at once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from schemas.errors import ErrorCode, TransientError
from worker.decode import ImageLimits, JpegHeader, check_jpeg, decode_image
from worker.models.base import Encoder
from worker.models.tensor_preprocess import through_pil

log = logging.getLogger(__name__)

DECODE_CHUNK_PIXELS: Final = 128_000_000  # ~384 MB of decoded RGB at a time
_TENSOR_MODES: Final = frozenset({"RGB", "L"})  # YCbCr and grayscale JPEGs


@dataclass(frozen=True)
class CheckedJpeg:
    """JPEG bytes that passed every check, waiting to be decoded on the device."""

    data: bytes
    header: JpegHeader


def check_for_tensor_decode(data: bytes, limits: ImageLimits) -> CheckedJpeg | None:
    """A JPEG torchvision should decode, None for anything Pillow should, or `ImageError`."""
    header = check_jpeg(data, limits)
    return CheckedJpeg(data, header) if header.mode in _TENSOR_MODES else None


class TensorDecoder:
    """Checked JPEGs → model input rows on the encoder's device, or each one's failure."""

    def __init__(self, encoder: Encoder, limits: ImageLimits,
                 device: torch.device | None = None) -> None:
        """Decodes on `device` (default: the encoder's)."""
        self._encoder = encoder
        self._limits = limits
        self._device = torch.device(encoder.device) if device is None else device
        self._preprocess = encoder.tensor_preprocess or through_pil(encoder)

    def pixels(self, jpegs: Sequence[CheckedJpeg]) -> list[torch.Tensor | Exception]:
        """One float [3, H, W] tensor on the device per JPEG, or the error that fails it;
        what torchvision cannot decode is decoded by Pillow here, on the calling thread."""
        return [self._with_pillow(jpeg.data) if row is None else row
                for jpeg, row in zip(jpegs, self.try_pixels(jpegs), strict=True)]

    def try_pixels(self, jpegs: Sequence[CheckedJpeg]) -> list[torch.Tensor | None]:
        """One float [3, H, W] tensor on the device per JPEG; None where torchvision could not
        decode or preprocess it, for the caller to hand to Pillow."""
        rows: list[torch.Tensor | None] = [None] * len(jpegs)
        for chunk in _chunks(jpegs):
            decoded = self._decode([jpegs[i] for i in chunk])
            ok = [i for i, image in zip(chunk, decoded, strict=True) if image is not None]
            if not ok:
                continue
            try:
                batch = self._preprocess([image for image in decoded if image is not None])
            except Exception:  # these few go the Pillow way instead
                log.exception("tensor preprocessing failed; using Pillow for %d images", len(ok))
                continue
            for i, row in zip(ok, batch, strict=True):
                rows[i] = row
        return rows

    def _decode(self, jpegs: list[CheckedJpeg]) -> list[torch.Tensor | None]:
        """Upright uint8 RGB [3, H, W] per JPEG, None where torchvision could not decode it."""
        encoded = [torch.frombuffer(bytearray(jpeg.data), dtype=torch.uint8) for jpeg in jpegs]
        if self._device.type == "cuda":
            # torchvision allocates the output on the current stream but has nvJPEG write it
            # from its own stream without waiting: memory just freed here (the previous
            # chunk's frames) may still be read by queued kernels (pytorch/vision PR 9606).
            torch.cuda.current_stream(self._device).synchronize()
        try:
            images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self._device)
        except Exception:  # noqa: BLE001 - one bad stream fails the call; find which
            images = [self._decode_one(one) for one in encoded]
        return [None if image is None else upright(image, jpeg.header.orientation)
                for image, jpeg in zip(images, jpegs, strict=True)]

    def _decode_one(self, encoded: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self._device)
        except Exception:  # noqa: BLE001 - Pillow decides what this JPEG is
            return None

    def _with_pillow(self, data: bytes) -> torch.Tensor | Exception:
        try:
            image = decode_image(data, self._limits)
            return self._encoder.preprocess_image(image).to(self._device)
        except torch.OutOfMemoryError as exc:
            return TransientError(f"out of device memory: {exc}", code=ErrorCode.INTERNAL)
        except Exception as exc:  # noqa: BLE001 - returned, to fail this job alone
            return exc


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A [C, H, W] image with EXIF `orientation` (1-8) applied, as `decode_image` applies it."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(-2, -1)  # Pillow's TRANSPOSE; the rest are flips of it
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(orientation)
    return image.flip(flips) if flips else image


def _chunks(jpegs: Sequence[CheckedJpeg]) -> Iterator[list[int]]:
    """Indices of `jpegs` in runs of at most `DECODE_CHUNK_PIXELS` stored pixels (or one)."""
    chunk: list[int] = []
    pixels = 0
    for i, jpeg in enumerate(jpegs):
        width, height = jpeg.header.size
        if chunk and pixels + width * height > DECODE_CHUNK_PIXELS:
            yield chunk
            chunk, pixels = [], 0
        chunk.append(i)
        pixels += width * height
    if chunk:
        yield chunk
