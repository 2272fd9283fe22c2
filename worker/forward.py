"""One micro-batch through the model, on the model thread: texts, or images (their JPEGs
decoded together on the device where asked, stacked, forwarded, scored for zero-shot labels).

A failed forward is retried item by item, so only the culprit fails.
"""

from __future__ import annotations

import logging
import time

import torch

from schemas.results import LabelScore
from worker import metrics
from worker.items import EncodedBatch, Item, ms_since
from worker.models.base import Encoder
from worker.prepare import stack_rows
from worker.prepare_stage import PrepareStage
from worker.settle import Settler
from worker.tensor_decode import TensorDecoder
from worker.zeroshot import LabelEmbeddingCache, score

log = logging.getLogger(__name__)


class BatchForward:
    def __init__(self, encoder: Encoder, decoder: TensorDecoder | None,
                 labels: LabelEmbeddingCache, prepare: PrepareStage, settle: Settler) -> None:
        """`decoder`: decodes the JPEGs the prepare stage left for the device (torch decoder)."""
        self._encoder = encoder
        self._decoder = decoder
        self._labels = labels
        self._prepare = prepare
        self._settle = settle

    def images(self, items: list[Item]) -> EncodedBatch | None:
        """Embeddings and labels of the items that survive; `items` keeps only those."""
        if self._decoder is not None:
            self._decode_on_device(items, self._decoder)
        if not items:
            return None
        start = time.perf_counter()
        metrics.BATCH_ITEMS.labels("image").observe(len(items))
        embeddings = self._forward_isolated(items, self._stack(items))
        if embeddings is None:
            return None
        for item in items:
            item.pixels = None  # release the tensor before the write stage
        labels = self._zero_shot(items, embeddings)
        _stamp_encode(items, ms_since(start))
        return EncodedBatch(items, embeddings.numpy(), labels, [False] * len(items), "image")

    def texts(self, items: list[Item]) -> EncodedBatch | None:
        if not items:
            return None
        start = time.perf_counter()
        metrics.BATCH_ITEMS.labels("text").observe(len(items))
        tokens = self._encoder.tokenize([item.job.text or "" for item in items])
        embeddings = self._encoder.encode_texts(tokens)
        _stamp_encode(items, ms_since(start))
        return EncodedBatch(items, embeddings.numpy(), [None] * len(items),
                            list(tokens.truncated), "text")

    def _decode_on_device(self, items: list[Item], decoder: TensorDecoder) -> None:
        """Decode the batch's JPEGs in one call. One that torchvision cannot decode goes back
        to the prepare threads for Pillow (which decides its fate) and joins a later batch:
        Pillow on the model thread would hold up the device."""
        pending = [(item, jpeg) for item in items if (jpeg := item.jpeg) is not None]
        if not pending:
            return
        start = time.perf_counter()
        rows = decoder.try_pixels([jpeg for _, jpeg in pending])
        elapsed = ms_since(start)
        for (item, jpeg), row in zip(pending, rows, strict=True):
            item.jpeg = None
            item.timings.decode_ms += elapsed
            if row is None:
                self._prepare.start(item, jpeg.data)
            else:
                item.pixels = row
        items[:] = [item for item in items if item.pixels is not None]

    def _stack(self, items: list[Item]) -> torch.Tensor:
        rows = [row for item in items if (row := item.pixels) is not None]
        return stack_rows(rows, self._encoder.device)

    def _forward_isolated(self, items: list[Item], pixels: torch.Tensor) -> torch.Tensor | None:
        """Forward the batch; if it fails, forward items one by one so only the culprit fails."""
        try:
            return self._encoder.encode_images(pixels)
        except Exception:
            log.exception("batch forward failed; isolating the failing item")
        survivors, rows = [], []
        for item, one in zip(items, pixels, strict=True):
            try:
                rows.append(self._encoder.encode_images(one.unsqueeze(0))[0])
                survivors.append(item)
            except Exception as exc:  # noqa: BLE001
                self._settle.fail(item, exc)
        items[:] = survivors
        return torch.stack(rows) if rows else None

    def _zero_shot(self, items: list[Item],
                   embeddings: torch.Tensor) -> list[list[LabelScore] | None]:
        labels: list[list[LabelScore] | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            if item.job.zero_shot is not None:
                groups.setdefault(item.job.zero_shot.model_dump_json(), []).append(i)
        for rows in groups.values():
            options = items[rows[0]].job.zero_shot
            assert options is not None
            scored = score(self._encoder, embeddings[rows], options, self._labels)
            for row, result in zip(rows, scored, strict=True):
                labels[row] = result
        return labels


def _stamp_encode(items: list[Item], elapsed_ms: float) -> None:
    for item in items:
        item.timings.encode_ms = elapsed_ms
