"""The HTTP API (FastAPI): submit jobs, read results and runs, see the served models and their
queues, receive upload events. `dualstream api` serves it with uvicorn; its OpenAPI document is
at `/openapi.json` (docs/api.md is made from it).

Every `/v1` route needs `Authorization: Bearer <api_token>` (the event routes take the
webhook's token, or basic auth with it as the password, as SNS HTTP subscriptions send it),
except the scaling route, which KEDA reads and which tells only counts. Bodies are validated by
the models in `schemas/` (422 names the field); a body over `api_max_body_bytes` is refused with
413 before it is read; a submission to a model whose backlog is over `api_max_backlog_jobs` gets
429 with Retry-After; one to a model no worker has announced is refused (409) or accepted with a
warning, as `unserved_models` says. `POST /v1/search` (producer/search.py) finds the nearest
images to a text or an image; without a `Searcher` (an install without numpy and pyarrow) it
answers 501.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    Header,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
)
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import BaseModel, Field

from control.broker import heartbeat_timing
from control.deadletters import DeadLetterStore
from control.queue_load import QueueLoad, queue_load
from control.served import ModelRegistry
from dualstream import __version__
from producer.client import Client
from producer.event_sources import EventSubmitter
from producer.events import EventJobTemplate
from producer.search import QueryFailed, Searcher, search
from producer.sns_confirm import SubscriptionConfirmer
from producer.webhook import authorized
from schemas.jobs import MAX_JOBS_PER_MESSAGE, MAX_RUN_ID, RUN_ID, Job
from schemas.keys import RedisKeys, queue_name
from schemas.results import JobResult, RunProgress
from schemas.search import (
    SearchCode,
    SearchError,
    SearchFailure,
    SearchProblem,
    SearchRequest,
    SearchResults,
)
from schemas.settings import Settings

REQUESTS = Counter("dualstream_api_requests_total", "API requests by route, method and status.",
                   ["route", "method", "status"])
BACKLOG_RETRY_AFTER_S = 30
MAX_BATCH = 1000
SEARCH_STATUS = {
    SearchCode.NOT_AVAILABLE: 501, SearchCode.NO_MODEL: 422, SearchCode.SET_NOT_FOUND: 404,
    SearchCode.SET_NOT_ALLOWED: 403, SearchCode.SET_UNREADABLE: 422,
    SearchCode.STORAGE_UNAVAILABLE: 503, SearchCode.WRONG_DIMENSION: 422,
    SearchCode.QUERY_TIMEOUT: 504,
}

RunIdPath = Annotated[str, Path(pattern=RUN_ID.pattern, max_length=MAX_RUN_ID)]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class Submitted(BaseModel):
    job_id: str
    queue: str
    warning: str | None = None


class BatchRequest(BaseModel):
    jobs: Annotated[list[Job], Field(min_length=1, max_length=MAX_BATCH)]
    run_id: Annotated[str, Field(pattern=RUN_ID.pattern, max_length=MAX_RUN_ID)] | None = None
    per_message: Annotated[int, Field(ge=1, le=MAX_JOBS_PER_MESSAGE)] = 32


class BatchSubmitted(BaseModel):
    job_ids: list[str]
    warnings: list[str] = []


class Failure(BaseModel):
    job_id: str
    code: str
    source: str


class ModelInfo(BaseModel):
    model: str
    queue: str
    workers: list[str]
    versions: list[str]
    queued_jobs: int
    held_jobs: int


class Scaling(BaseModel):
    """What KEDA's metrics-api trigger reads: `jobs` (queued plus held) per model queue."""

    queue: str
    queued_messages: int
    queued_jobs: int
    held_messages: int
    held_jobs: int
    live_consumers: int
    jobs: int


class BodyLimit:
    """413 for a body over `limit` bytes: by its Content-Length before any of it is read, and
    otherwise (chunked) by reading at most `limit` bytes before the app sees any."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self._app = app
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self._limit):
            too_large = declared.isdigit()
            await JSONResponse({"detail": "request body too large" if too_large
                                else "bad Content-Length"},
                               status_code=413 if too_large else 400)(scope, receive, send)
            return
        if declared is not None:
            await self._app(scope, receive, send)  # the server stops at Content-Length
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = bool(message.get("more_body"))
            if size > self._limit:
                await JSONResponse({"detail": "request body too large"},
                                   status_code=413)(scope, receive, send)
                return
        body, replayed = b"".join(chunks), False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self._app(scope, replay, send)


@dataclass
class ApiContext:
    """What the routes share: one per app, in `app.state.context`."""

    settings: Settings
    client: Client
    keys: RedisKeys
    registry: ModelRegistry
    events: EventSubmitter
    heartbeat_ttl_s: float
    api_token: str | None
    webhook_token: str | None
    searcher: Searcher | None = None

    def load(self, queue: str) -> QueueLoad:
        return queue_load(self.client.redis, self.keys, queue,
                          heartbeat_ttl_s=self.heartbeat_ttl_s)

    def admit(self, models: set[str]) -> list[str]:
        """Refuse a submission (429 for a backlog over the bound, 409 for a model no worker
        serves, when so set), or the warnings it is accepted with."""
        served = self.registry.queues()
        bound, policy = self.settings.api_max_backlog_jobs, self.settings.unserved_models
        warnings = []
        for model in sorted(models):
            queue = queue_name(model)
            jobs = self.load(queue).jobs if bound else 0
            if bound and jobs >= bound:
                raise HTTPException(429, f"{model!r} has {jobs} jobs waiting, over the bound "
                                    f"of {bound}",
                                    headers={"Retry-After": str(BACKLOG_RETRY_AFTER_S)})
            if queue not in served and policy != "allow":
                names = sorted({s.model for group in served.values() for s in group})
                message = (f"no worker has served {model!r} in the last minute; served: "
                           f"{', '.join(names) or 'none'}")
                if policy == "refuse":
                    raise HTTPException(409, message)
                warnings.append(message)
        return warnings


def _context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.context
    return context


Context = Annotated[ApiContext, Depends(_context)]


def _bearer(context: Context, authorization: Annotated[str | None, Header()] = None) -> None:
    token = context.api_token
    if token is None and not context.settings.api_require_token:
        return
    scheme, _, value = (authorization or "").partition(" ")
    if (token is None or scheme.lower() != "bearer"
            or not hmac.compare_digest(value.strip().encode(), token.encode())):
        raise HTTPException(401, "a bearer token is required",
                            headers={"WWW-Authenticate": "Bearer"})


def _event_token(context: Context, authorization: Annotated[str | None, Header()] = None) -> None:
    token = context.webhook_token
    if token is None and not context.settings.webhook_require_token:
        return
    if token is None or not authorized(authorization or "", token):
        raise HTTPException(401, "the webhook token is required",
                            headers={"WWW-Authenticate": "Bearer"})


v1 = APIRouter(prefix="/v1", dependencies=[Depends(_bearer)])
scaling = APIRouter(prefix="/v1")
events = APIRouter(prefix="/v1/events", dependencies=[Depends(_event_token)])
probes = APIRouter(include_in_schema=False)


@v1.post("/jobs", status_code=202, response_model=Submitted, summary="Submit one job")
def submit(job: Job, context: Context) -> Submitted:
    warnings = context.admit({job.model})
    return Submitted(job_id=context.client.submit(job), queue=queue_name(job.model),
                     warning=warnings[0] if warnings else None)


@v1.post("/jobs/batch", status_code=202, response_model=BatchSubmitted,
         summary="Submit up to 1,000 jobs")
def submit_batch(batch: BatchRequest, context: Context) -> BatchSubmitted:
    warnings = context.admit({job.model for job in batch.jobs})
    ids = context.client.submit_many(batch.jobs, per_message=batch.per_message,
                                     run_id=batch.run_id)
    return BatchSubmitted(job_ids=ids, warnings=warnings)


@v1.get("/jobs/{job_id}", response_model=JobResult, response_model_exclude_none=True,
        summary="A job's status and result")
def get_job(job_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")],
            context: Context) -> JobResult:
    result = context.client.results.get(job_id)
    if result is None:
        raise HTTPException(404, f"no job {job_id} (unknown, or its result expired)")
    return result


@v1.get("/runs/{run_id}", response_model=RunProgress, summary="A run's progress")
def get_run(run_id: RunIdPath, context: Context) -> RunProgress:
    progress = context.client.run_progress(run_id)
    if not progress.exists:
        raise HTTPException(404, f"no run {run_id}")
    return progress


@v1.get("/runs/{run_id}/failures", response_model=list[Failure],
        summary="A run's failed jobs, oldest first")
def get_failures(run_id: RunIdPath, context: Context,
                 limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> list[Failure]:
    return [Failure(job_id=job_id, code=code, source=source)
            for job_id, code, source in context.client.runs.failures(run_id, limit)]


@v1.get("/models", response_model=list[ModelInfo],
        summary="The models workers serve, with their queues")
def get_models(context: Context) -> list[ModelInfo]:
    models = []
    for queue, group in sorted(context.registry.queues().items()):
        load = context.load(queue)
        models.append(ModelInfo(model=group[0].model, queue=queue,
                                workers=sorted(s.worker for s in group),
                                versions=sorted({s.version for s in group}),
                                queued_jobs=load.queued_jobs, held_jobs=load.held_jobs))
    return models


_SEARCH_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"model": SearchFailure, "description": "the set is outside DUALSTREAM_SEARCH_ROOTS"},
    404: {"model": SearchFailure, "description": "no such export, or no rows in it or the run"},
    422: {"description": "an invalid request (`detail[]`, as for jobs), or a query job that "
          "failed (`detail`: a `SearchProblem` with the job's error code)"},
    501: {"model": SearchFailure, "description": "the API is installed without numpy and "
          "pyarrow (`pip install 'dualstream[search]'`)"},
    502: {"model": SearchFailure, "description": "the query job failed on the service's side"},
    503: {"model": SearchFailure, "description": "object storage failed; try again"},
    504: {"model": SearchFailure, "description": "no worker finished the query job in "
          "DUALSTREAM_SEARCH_TIMEOUT_S"},
}


@v1.post("/search", response_model=SearchResults, responses=_SEARCH_ERRORS,
         summary="The images nearest a text or an image, in an export or a run")
def search_route(request: SearchRequest, context: Context) -> SearchResults:
    try:
        return search(request, searcher=context.searcher, client=context.client,
                      default_model=context.settings.model,
                      timeout_s=context.settings.search_timeout_s, admit=context.admit)
    except SearchError as exc:
        raise HTTPException(SEARCH_STATUS[exc.code], SearchProblem(
            code=exc.code, message=exc.message).model_dump(exclude_none=True)) from None
    except QueryFailed as exc:
        raise HTTPException(502 if exc.ours else 422, SearchProblem(
            code=exc.code, message=str(exc), job_id=exc.job_id).model_dump()) from None


@scaling.get("/models/{queue}/scaling", response_model=Scaling,
             summary="Jobs queued and held for a model queue (KEDA's metrics-api trigger)")
def get_scaling(queue: Annotated[str, Path(pattern=r"^dualstream\.[A-Za-z0-9._-]+$",
                                           max_length=200)], context: Context) -> Scaling:
    return Scaling(**context.load(queue).as_json())


@events.post("/minio", summary="A MinIO webhook notification")
async def minio_event(request: Request, context: Context) -> dict[str, Any]:
    return await _event(request, context)


@events.post("/sns", summary="An SNS notification or subscription confirmation")
async def sns_event(request: Request, context: Context) -> dict[str, Any]:
    return await _event(request, context)


async def _event(request: Request, context: Context) -> dict[str, Any]:
    body = await request.body()
    summary = await run_in_threadpool(
        context.events.handle, body, source="webhook",
        delivery=request.headers.get("x-amz-sns-message-id"))
    return summary.as_dict()


@probes.get("/healthz")
def healthz() -> PlainTextResponse:
    return PlainTextResponse("ok\n")


@probes.get("/readyz")
def readyz(context: Context) -> PlainTextResponse:
    try:
        context.client.redis.ping()
    except Exception:  # noqa: BLE001 - any failure means not ready
        return PlainTextResponse("redis unreachable\n", status_code=503)
    return PlainTextResponse("ok\n")


@probes.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def _count_requests(request: Request,
                          call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    response = await call_next(request)
    route = request.scope.get("route")
    REQUESTS.labels(getattr(route, "path", "unmatched"), request.method,
                    str(response.status_code)).inc()
    return response


def create_app(settings: Settings, client: Client | None = None,
               searcher: Searcher | None = None) -> FastAPI:
    """The API; `searcher` answers `POST /v1/search` (without one, the route answers 501)."""
    client = client or Client(settings)
    api_token = settings.api_token.get_secret_value() if settings.api_token else None
    app = FastAPI(title="dualstream", version=__version__,
                  description="Embeddings and zero-shot labels for images and texts, from a "
                  "queue. Every /v1 route but the scaling one needs a bearer token.")
    app.state.context = ApiContext(
        settings=settings, client=client, keys=RedisKeys(settings.key_prefix),
        registry=ModelRegistry(client.redis, RedisKeys(settings.key_prefix)),
        events=EventSubmitter(
            client, EventJobTemplate(model=settings.model or ""),
            DeadLetterStore.for_settings(client.redis, settings),
            SubscriptionConfirmer(extra_hosts=tuple(settings.sns_confirm_hosts))),
        heartbeat_ttl_s=heartbeat_timing(settings)[1], api_token=api_token,
        webhook_token=(settings.webhook_token.get_secret_value() if settings.webhook_token
                       else api_token),
        searcher=searcher)
    app.middleware("http")(_count_requests)
    for router in (v1, scaling, events, probes):
        app.include_router(router)
    return app


def wrapped(settings: Settings, client: Client | None = None,
            searcher: Searcher | None = None) -> ASGIApp:
    """The app behind its body limit: what `dualstream api` serves."""
    return BodyLimit(create_app(settings, client, searcher), settings.api_max_body_bytes)
