"""One image's bytes → model input, the way the settings ask: Pillow (the reference libraries'
own path), Pillow with scaled JPEG decoding (`jpeg_draft`), or torchvision (`image_decoder`).

With the torch decoder and a model on a GPU, a JPEG is only checked here and handed on as a
`CheckedJpeg`: the model thread decodes each batch's JPEGs together on the device
(`TensorDecoder`). Everywhere else the result is the model input itself.

`image_background` reaches Pillow's decoding only: the JPEGs torchvision decodes have no alpha.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import ImageColor

from schemas.settings import Settings
from worker.decode import RGB, ImageLimits, decode_image, is_jpeg
from worker.models.base import Encoder
from worker.tensor_decode import CheckedJpeg, TensorDecoder, check_for_tensor_decode


class ImagePreparer:
    def __init__(self, settings: Settings, encoder: Encoder, *,
                 device_batches: bool | None = None) -> None:
        """`device_batches`: leave checked JPEGs to be decoded in batches on the device
        (torch decoder only; default: when the model is not on the CPU)."""
        self._encoder = encoder
        self.limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels,
                                  settings.max_image_side)
        self._draft_side = encoder.draft_side if settings.jpeg_draft else None
        self._background = _colour(settings.image_background)
        on_gpu = torch.device(encoder.device).type != "cpu"
        self.device_batches = settings.image_decoder == "torch" and (
            on_gpu if device_batches is None else device_batches)
        # One JPEG at a time on a prepare thread is decoded on the CPU, even for a GPU model:
        # per-image GPU decodes would queue behind the forward pass.
        decode_on = torch.device(encoder.device) if self.device_batches else torch.device("cpu")
        self.tensor_decoder = (TensorDecoder(encoder, self.limits, decode_on)
                               if settings.image_decoder == "torch" else None)

    def prepare(self, data: bytes) -> torch.Tensor | CheckedJpeg:
        """Model input [3, H, W]; or, with device batches, the JPEG checked for the device.
        Raises `ImageError` (or the encoder's own error) for an image that cannot be used."""
        decoder = self.tensor_decoder
        jpeg = check_for_tensor_decode(data, self.limits) if decoder and is_jpeg(data) else None
        if decoder is None or jpeg is None:
            return self.with_pillow(data)
        if self.device_batches:
            return jpeg
        row = decoder.pixels([jpeg])[0]
        if isinstance(row, Exception):
            raise row
        return row

    def with_pillow(self, data: bytes) -> torch.Tensor:
        """Model input through Pillow, whatever the decoder setting."""
        image = decode_image(data, self.limits, draft_side=self._draft_side,
                             background=self._background)
        return self._encoder.preprocess_image(image)

    def pixels(self, data: bytes) -> torch.Tensor:
        """Model input for one image, never deferred (for callers without a batching stage)."""
        prepared = self.prepare(data)
        if isinstance(prepared, CheckedJpeg):
            raise TypeError("pixels() needs an ImagePreparer without device batches")
        return prepared

    def batch(self, prepared: Sequence[torch.Tensor | CheckedJpeg]) -> torch.Tensor:
        """One batch of model input from `prepare`'s results, deferred JPEGs decoded together;
        raises the first image's failure (for callers that fail a batch as a whole)."""
        rows = list(prepared)
        deferred = {i: row for i, row in enumerate(rows) if isinstance(row, CheckedJpeg)}
        if deferred:
            if self.tensor_decoder is None:
                raise TypeError("a deferred JPEG needs the torch decoder")
            decoded = self.tensor_decoder.pixels(list(deferred.values()))
            for i, row in zip(deferred, decoded, strict=True):
                if isinstance(row, Exception):
                    raise row
                rows[i] = row
        return stack_rows([row for row in rows if isinstance(row, torch.Tensor)],
                          self._encoder.device)


def _colour(name: str | None) -> RGB | None:
    """`image_background` as an RGB triple; a name Pillow does not know fails at start-up."""
    if name is None:
        return None
    try:
        red, green, blue, *_ = ImageColor.getrgb(name)
    except ValueError as exc:
        raise ValueError(f"image_background: {exc}") from exc
    return red, green, blue


def stack_rows(rows: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack model-input rows. Rows decoded on the device and rows from Pillow (on the CPU)
    meet on `device`; an all-CPU batch stays on the CPU for one pinned copy in the encoder."""
    if any(row.device != rows[0].device for row in rows):
        rows = [row.to(device) for row in rows]
    return torch.stack(list(rows))
