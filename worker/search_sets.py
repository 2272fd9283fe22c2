"""What `POST /v1/search` searches (producer/search.py's `Searcher`): an export, in the layout
`dualstream export` writes (a folder or s3://bucket/prefix), or a run's committed rows, read as
`dualstream export` reads them from the model's shards; both searched by `ExportIndex` (numpy
exact, faiss HNSW past 200k rows).

Loaded sets are kept while their vectors fit `search_cache_mb`, the least recently used going
first, and loaded again when what they came from changed: an export's files (each file's mtime
and size, or its ETag: one listing per search), a run's counters (a run still being written is
read again after each change). Needs numpy and pyarrow (the `search` extra), not torch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import redis

from control.connections import s3_client
from control.objects import LocalOutputStore, S3OutputStore, local_path
from control.results import RunStore
from schemas.errors import DualstreamError, ErrorCode, SourceError, TransientError
from schemas.keys import RedisKeys, ShardPaths
from schemas.search import SearchCode, SearchError, SearchHit, SearchRequest
from schemas.settings import Settings
from worker.export import export_run
from worker.search import ExportIndex

Stamp = tuple[object, ...]


@dataclass(frozen=True)
class IndexSet:
    """A loaded set, as the route searches it (producer/search.py `SearchSet`)."""

    index: ExportIndex

    @property
    def rows(self) -> int:
        return len(self.index.job_ids)

    def nearest(self, query: Sequence[float], k: int) -> list[SearchHit]:
        if len(query) != self.index.dim:
            raise SearchError(SearchCode.WRONG_DIMENSION,
                              f"the model makes {len(query)}-d vectors, the set holds "
                              f"{self.index.dim}-d ones: it was made by another model")
        return [SearchHit(score=hit.score, job_id=hit.job_id, source=hit.source)
                for hit in self.index.search(np.asarray(query, dtype=np.float32), k)]


class IndexCache:
    """Loaded indexes by what they came from, while their vectors fit `limit_bytes`; one
    larger than that is used once and not kept."""

    def __init__(self, limit_bytes: int) -> None:
        self._limit = limit_bytes
        self._entries: OrderedDict[str, tuple[Stamp, ExportIndex]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, stamp: Stamp, load: Callable[[], ExportIndex]) -> ExportIndex:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == stamp:
                self._entries.move_to_end(key)
                return entry[1]
        index = load()  # outside the lock: other sets are searched meanwhile
        with self._lock:
            self._entries[key] = (stamp, index)
            self._entries.move_to_end(key)
            used = sum(kept.vectors.nbytes for _, kept in self._entries.values())
            while used > self._limit:
                _, (_, dropped) = self._entries.popitem(last=False)
                used -= dropped.vectors.nbytes
        return index

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)


class ExportSearcher:
    """Opens exports and runs for the API, and keeps them loaded (`IndexCache`)."""

    def __init__(self, settings: Settings, client: redis.Redis, s3: Any | None = None) -> None:
        self._settings = settings
        self._redis = client
        self._keys = RedisKeys(settings.key_prefix)
        self._runs = RunStore(client, self._keys, settings.result_ttl_s)
        self._s3 = s3
        self.cache = IndexCache(settings.search_cache_mb * 2**20)

    def open(self, request: SearchRequest, model: str) -> IndexSet:
        if request.export is not None:
            return self._export(request.export, request.modality)
        return self._run(request.run or "", model, request.modality)

    def _export(self, location: str, modality: str) -> IndexSet:
        store = self._store(self._allowed(location))
        stamp = _listing(store, f"{modality}/")
        if not any(key.endswith(".npy") for key, _ in stamp):
            raise SearchError(SearchCode.SET_NOT_FOUND,
                              f"no {modality} embeddings under {location} (an export holds "
                              f"{modality}/embeddings/*.npy: see `dualstream export`)")
        return IndexSet(_loaded(self.cache, f"export {store.root}", stamp,
                                lambda: ExportIndex.load(store, modality)))

    def _run(self, run_id: str, model: str, modality: str) -> IndexSet:
        progress = self._runs.progress(run_id)
        if not progress.exists:
            raise SearchError(SearchCode.SET_NOT_FOUND, f"no run {run_id}")
        shards = self._store(f"{self._settings.output_uri.rstrip('/')}/"
                             f"{ShardPaths(model, modality).directory}")
        stamp = (progress.queued, progress.done, progress.failed, progress.passes)
        return IndexSet(_loaded(self.cache, f"run {run_id} {shards.root}", stamp,
                                lambda: self._run_rows(run_id, shards, modality)))

    def _run_rows(self, run_id: str, shards: LocalOutputStore | S3OutputStore,
                  modality: str) -> ExportIndex:
        """The run's committed rows, one per job, as `dualstream export` would write them."""
        rows = MemoryStore()
        summary = export_run(run_id, shards, rows, client=self._redis, keys=self._keys)
        if not summary.rows.get(modality):
            raise SearchError(SearchCode.SET_NOT_FOUND,
                              f"run {run_id} has no committed {modality} rows under "
                              f"{shards.root} (was it run with another model?)")
        return ExportIndex.load(rows, modality)

    def _allowed(self, location: str) -> str:
        roots = self._settings.search_roots
        if roots and not any(_under(location, root) for root in roots):
            raise SearchError(SearchCode.SET_NOT_ALLOWED,
                              f"{location} is not under DUALSTREAM_SEARCH_ROOTS")
        return location

    def _store(self, location: str) -> LocalOutputStore | S3OutputStore:
        if not location.startswith("s3://"):
            return LocalOutputStore(location)
        if self._s3 is None:
            self._s3 = s3_client(self._settings)
        try:
            return S3OutputStore(location, self._s3)
        except SourceError as exc:
            raise SearchError(SearchCode.SET_NOT_FOUND, exc.message) from None


class MemoryStore:
    """An output store in memory: where a run's rows are gathered to be searched."""

    root = "memory:"

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}

    def put(self, key: str, data: bytes) -> None:
        self._data[key] = data

    def get(self, key: str) -> bytes | None:
        return self._data.get(key)

    def exists(self, key: str) -> bool:
        return key in self._data

    def delete(self, key: str) -> None:
        self._data.pop(key, None)

    def list(self, prefix: str) -> Iterator[str]:
        yield from sorted(key for key in self._data if key.startswith(prefix))

    def uri(self, key: str) -> str:
        return f"memory:{key}"


def _listing(store: LocalOutputStore | S3OutputStore,
             prefix: str) -> tuple[tuple[str, str], ...]:
    try:
        return tuple(sorted(store.stamps(prefix)))
    except SourceError as exc:
        code = (SearchCode.SET_NOT_FOUND if exc.code is ErrorCode.SOURCE_NOT_FOUND
                else SearchCode.SET_NOT_ALLOWED)
        raise SearchError(code, exc.message) from None
    except TransientError as exc:
        raise SearchError(SearchCode.STORAGE_UNAVAILABLE, exc.message) from None


def _loaded(cache: IndexCache, key: str, stamp: Stamp,
            load: Callable[[], ExportIndex]) -> ExportIndex:
    try:
        return cache.get(key, stamp, load)
    except TransientError as exc:
        raise SearchError(SearchCode.STORAGE_UNAVAILABLE, exc.message) from None
    except (DualstreamError, ValueError, OSError, KeyError, pa.ArrowException) as exc:
        raise SearchError(SearchCode.SET_UNREADABLE,
                          f"{key}: not readable as an export: {exc}") from None


def _under(location: str, root: str) -> bool:
    if location.startswith("s3://") or root.startswith("s3://"):
        return (location.rstrip("/") + "/").startswith(root.rstrip("/") + "/")
    return local_path(location).resolve().is_relative_to(local_path(root).resolve())
