"""Search for the HTTP API (`POST /v1/search`), with no model in the API's process: the query
is embedded by a worker, as an ordinary job whose result keeps its embedding, and the nearest
rows are found by a `Searcher`, which the composition root hands in (`dualstream/serve.py`:
`worker/search_sets.py` where numpy and pyarrow are installed, else none, and the route answers
501).

A query is a job like any other: the same text (or image) and model is the same job, so a
query asked again is answered from its record, and its row lands in the model's outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from producer.bulk import source_etag
from producer.client import Client, ResultTimeout
from schemas.errors import ErrorCode
from schemas.jobs import Job, Task
from schemas.results import JobResult, Status
from schemas.search import SearchCode, SearchError, SearchHit, SearchRequest, SearchResults

SEARCH_EXTRA = "pip install 'dualstream[search]' (numpy and pyarrow) where the API runs"
# A query job that failed for these reasons failed on the service's side, not the request's.
_NOT_THE_QUERY = frozenset({ErrorCode.TRANSIENT_STORAGE, ErrorCode.TRANSIENT_BROKER,
                            ErrorCode.JOB_BUSY, ErrorCode.POISON_MESSAGE, ErrorCode.INTERNAL})


class SearchSet(Protocol):
    """Rows loaded for searching: an export, or a run's committed rows."""

    @property
    def rows(self) -> int: ...

    def nearest(self, query: Sequence[float], k: int) -> list[SearchHit]: ...


class Searcher(Protocol):
    def open(self, request: SearchRequest, model: str) -> SearchSet:
        """The set the request names, loaded (or cached); `SearchError` when it cannot be."""
        ...


class QueryFailed(Exception):
    """The query's job failed: its error code and message travel on to the caller."""

    def __init__(self, result: JobResult) -> None:
        code = result.error.code if result.error else ErrorCode.INTERNAL
        super().__init__(result.error.message if result.error else "the query job failed")
        self.code = code
        self.job_id = result.job_id
        self.ours = code in _NOT_THE_QUERY


def query_job(request: SearchRequest, model: str) -> Job:
    """A text or image embedding job; a local image's job names its content, as a CLI
    submission's does."""
    if request.text is not None:
        return Job(task=Task.TEXT_EMBEDDING, text=request.text, model=model)
    image = request.image or ""
    return Job(task=Task.IMAGE_EMBEDDING, image=image, model=model, etag=source_etag(image))


def embed_query(client: Client, job: Job, timeout_s: float) -> list[float]:
    """The job's embedding, from a worker. A job done before without its embedding kept (a
    bulk run's) is run again for it."""
    result = _settled(client, job, timeout_s, force=False)
    if result.status is Status.DONE and result.embedding is None:
        result = _settled(client, job, timeout_s, force=True)
    if result.status is Status.FAILED or result.embedding is None:
        raise QueryFailed(result)
    return result.embedding


def _settled(client: Client, job: Job, timeout_s: float, *, force: bool) -> JobResult:
    job_id = client.submit(job, force=force)
    try:
        return client.result(job_id, timeout=timeout_s)
    except ResultTimeout:
        raise SearchError(SearchCode.QUERY_TIMEOUT,
                          f"no worker finished the query job {job_id} within {timeout_s:g} s "
                          f"(DUALSTREAM_SEARCH_TIMEOUT_S); is a worker serving "
                          f"{job.model!r}?") from None


def search(request: SearchRequest, *, searcher: Searcher | None, client: Client,
           default_model: str, timeout_s: float,
           admit: Callable[[set[str]], list[str]]) -> SearchResults:
    """Open the set (a missing one is refused before any job), embed the query, search."""
    if searcher is None:
        raise SearchError(SearchCode.NOT_AVAILABLE,
                          f"this API was installed without search: {SEARCH_EXTRA}")
    model = request.model or default_model
    if not model:
        raise SearchError(SearchCode.NO_MODEL,
                          "no model: give `model`, or set DUALSTREAM_MODEL where the API runs")
    job = query_job(request, model)  # its model is the canonical spelling
    rows = searcher.open(request, job.model)
    admit({job.model})
    query = embed_query(client, job, timeout_s)
    return SearchResults(query_job_id=job.job_id, model=job.model, rows=rows.rows,
                         hits=rows.nearest(query, request.k))
