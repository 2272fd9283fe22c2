"""One micro-batch through the model, in two steps on two threads: staging (the staging
thread: JPEGs decoded on the device where asked, rows stacked, copied, cast and laid out on the
staging stream; texts tokenized), then the forward pass and zero-shot scores (the model thread).

A forward pass that runs out of device memory is retried on each half of the batch, down to
one item; one that fails otherwise is retried item by item, so only the culprit fails. An item
that fails in staging fails alone too.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import torch

from schemas.errors import ErrorCode, TransientError
from schemas.results import LabelScore
from worker import metrics
from worker.device_stream import DeviceStager, StagedPixels
from worker.items import EncodedBatch, Item, ms_since
from worker.models.base import Encoder, TokenizedTexts
from worker.prepare import stack_rows
from worker.prepare_stage import PrepareStage
from worker.settle import Settler
from worker.tensor_decode import TensorDecoder
from worker.zeroshot import LabelEmbeddingCache, score

log = logging.getLogger(__name__)

# Rows [start, stop) of the staged batch → their embeddings.
RowsForward = Callable[[int, int], torch.Tensor]


class BatchForward:
    def __init__(self, encoder: Encoder, decoder: TensorDecoder | None,
                 labels: LabelEmbeddingCache, prepare: PrepareStage, settle: Settler,
                 stager: DeviceStager | None = None) -> None:
        """`decoder`: decodes the JPEGs the prepare stage left for the device (torch decoder).
        `stager`: puts batches on the device (default: the encoder's device and dtype)."""
        self._encoder = encoder
        self._decoder = decoder
        self._labels = labels
        self._prepare = prepare
        self._settle = settle
        self._stager = stager or DeviceStager(encoder.device, encoder.dtype)

    # The staging thread ------------------------------------------------------------------
    def stage_images(self, items: list[Item]) -> StagedPixels | None:
        """The batch as model input on the device; `items` keeps only those staged."""
        with self._stager.on_stream():
            if self._decoder is not None:
                self._decode_on_device(items, self._decoder)
            batch = self._stack_isolated(items) if items else None
        for item in items:
            item.pixels = None  # the batch holds them now
        return None if batch is None else self._stager.stage(batch)

    def stage_texts(self, items: list[Item]) -> TokenizedTexts | None:
        return self._encoder.tokenize([item.job.text or "" for item in items]) if items else None

    # The model thread --------------------------------------------------------------------
    def images(self, items: list[Item], staged: StagedPixels) -> EncodedBatch | None:
        """Embeddings and labels of the items that survive; `items` keeps only those."""
        start = time.perf_counter()
        metrics.BATCH_ITEMS.labels("image").observe(len(items))
        pixels = self._stager.hand_over(staged)
        embeddings = self._forward(
            items, lambda first, stop: self._encoder.encode_images(pixels[first:stop]))
        if embeddings is None:
            return None
        labels = self._zero_shot(items, embeddings)
        _stamp_encode(items, ms_since(start))
        return EncodedBatch(items, embeddings.numpy(), labels, [False] * len(items), "image")

    def texts(self, items: list[Item], tokens: TokenizedTexts) -> EncodedBatch | None:
        start = time.perf_counter()
        metrics.BATCH_ITEMS.labels("text").observe(len(items))
        truncated = dict(zip(items, tokens.truncated, strict=True))
        embeddings = self._forward(
            items, lambda first, stop: self._encoder.encode_texts(_rows(tokens, first, stop)))
        if embeddings is None:
            return None
        _stamp_encode(items, ms_since(start))
        return EncodedBatch(items, embeddings.numpy(), [None] * len(items),
                            [truncated[item] for item in items], "text")

    def _decode_on_device(self, items: list[Item], decoder: TensorDecoder) -> None:
        """Decode the batch's JPEGs in one call. One that torchvision cannot decode goes back
        to the prepare threads for Pillow (which decides its fate) and joins a later batch:
        Pillow on the staging thread would hold up the device."""
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

    def _stack_isolated(self, items: list[Item]) -> torch.Tensor | None:
        """Stack the batch; if that fails (but for lack of memory: retried whole), fail the
        items that cannot be stacked, alone or with the batch's shape, and stack the rest."""
        try:
            return self._stack(items)
        except torch.OutOfMemoryError:
            raise
        except Exception:
            if len(items) == 1:
                raise
            log.exception("staging a batch failed; isolating the failing items")
        items[:] = [item for item in items if self._stacks_alone(item)]
        items[:] = self._with_common_shape(items)
        return self._stack(items) if items else None

    def _stacks_alone(self, item: Item) -> bool:
        try:
            self._stack([item])
            return True
        except Exception as exc:  # noqa: BLE001 - this job alone fails
            self._settle.fail(item, retryable(exc))
            return False

    def _with_common_shape(self, items: list[Item]) -> list[Item]:
        shapes = Counter(tuple(item.pixels.shape) for item in items if item.pixels is not None)
        if len(shapes) <= 1:
            return items
        common = shapes.most_common(1)[0][0]
        kept = []
        for item in items:
            shape = tuple(item.pixels.shape) if item.pixels is not None else None
            if shape == common:
                kept.append(item)
            else:
                self._settle.fail(item, RuntimeError(
                    f"model input of shape {shape} in a batch of shape {common}"))
        return kept

    def _forward(self, items: list[Item], forward: RowsForward) -> torch.Tensor | None:
        """Embeddings of the items that survive, in order; `items` keeps only those."""
        survivors, chunks = self._halving(items, 0, forward)
        items[:] = survivors
        return torch.cat(chunks) if chunks else None

    def _halving(self, items: list[Item], first: int,
                 forward: RowsForward) -> tuple[list[Item], list[torch.Tensor]]:
        """Forward rows `first`.. of `items`; out of device memory, each half on its own, down
        to one item, which is then retried later; any other failure, item by item."""
        try:
            return items, [forward(first, first + len(items))]
        except torch.OutOfMemoryError as exc:
            if len(items) == 1:
                self._settle.fail(items[0], retryable(exc))
                return [], []
            log.warning("out of device memory for a batch of %d; forwarding halves", len(items))
        except Exception:
            log.exception("batch forward failed; isolating the failing item")
            return self._one_by_one(items, first, forward)
        half = len(items) // 2
        left, left_rows = self._halving(items[:half], first, forward)
        right, right_rows = self._halving(items[half:], first + half, forward)
        return left + right, left_rows + right_rows

    def _one_by_one(self, items: list[Item], first: int,
                    forward: RowsForward) -> tuple[list[Item], list[torch.Tensor]]:
        survivors, rows = [], []
        for row, item in enumerate(items, start=first):
            try:
                rows.append(forward(row, row + 1))
                survivors.append(item)
            except Exception as exc:  # noqa: BLE001
                self._settle.fail(item, retryable(exc))
        return survivors, rows

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


def _rows(tokens: TokenizedTexts, first: int, stop: int) -> TokenizedTexts:
    if first == 0 and stop == len(tokens):
        return tokens
    return TokenizedTexts({name: t[first:stop] for name, t in tokens.tensors.items()},
                          tokens.truncated[first:stop])


def retryable(exc: Exception, what: str = "a single item") -> Exception:
    """The failure jobs get: out of device memory (for `what`) is retried later (then
    dead-lettered, never lost), with a message that says so; anything else as it is."""
    if isinstance(exc, torch.OutOfMemoryError):
        return TransientError(f"out of device memory for {what}: {exc}",
                              code=ErrorCode.INTERNAL)
    return exc
