"""Nearest neighbours over an export (`worker/export.py`): text → images and image → images.

Exact (one matrix product, numpy) up to `EXACT_UP_TO` rows; past that a faiss inner-product
index (`IndexHNSWFlat`) when faiss is installed, else exact all the same. Vectors are
L2-normalised, so inner product is cosine.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from control.objects import OutputStore

EXACT_UP_TO = 200_000


@dataclass(frozen=True)
class Hit:
    score: float
    job_id: str
    source: str


@dataclass
class ExportIndex:
    vectors: np.ndarray  # float32 [rows, dim]
    job_ids: list[str]
    sources: list[str]

    @classmethod
    def load(cls, store: OutputStore, modality: str = "image") -> ExportIndex:
        names = sorted(k for k in store.list(f"{modality}/embeddings/") if k.endswith(".npy"))
        vectors, job_ids, sources = [], [], []
        for name in names:
            vectors.append(np.load(io.BytesIO(store.get(name) or b""), allow_pickle=False))
            metadata = name.replace("/embeddings/emb_", "/metadata/metadata_")
            table = pq.read_table(io.BytesIO(store.get(metadata.removesuffix(".npy")
                                                      + ".parquet") or b""))
            if table.num_rows != len(vectors[-1]):
                raise ValueError(f"{name} holds {len(vectors[-1])} vectors but its metadata "
                                 f"{table.num_rows} rows")
            job_ids += table.column("job_id").to_pylist()
            sources += table.column("source").to_pylist()
        if not vectors:
            raise FileNotFoundError(f"no {modality} embeddings under {store.root}")
        return cls(np.concatenate(vectors).astype(np.float32), job_ids, sources)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def search(self, query: np.ndarray, k: int) -> list[Hit]:
        query = np.array(query, dtype=np.float32).reshape(1, -1)  # a copy: the caller's stays
        query /= max(float(np.linalg.norm(query)), 1e-12)
        k = min(k, len(self.job_ids))
        if len(self.job_ids) > EXACT_UP_TO and _faiss() is not None:
            scores, rows = self._faiss_index.search(query, k)
            found = list(zip(scores[0].tolist(), rows[0].tolist(), strict=True))
        else:
            scores = self.vectors @ query[0]
            top = np.argpartition(-scores, k - 1)[:k]
            found = sorted(((float(scores[i]), int(i)) for i in top), reverse=True)
        return [Hit(score, self.job_ids[row], self.sources[row]) for score, row in found
                if row >= 0]

    @cached_property
    def _faiss_index(self) -> Any:
        """Built on the first search past `EXACT_UP_TO` rows, then kept with the index (a
        process that searches again, as the API does, does not build it again)."""
        faiss = _faiss()
        index = faiss.IndexHNSWFlat(self.vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.add(self.vectors)
        return index


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    return faiss
