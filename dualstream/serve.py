"""`dualstream api`: the HTTP API (producer/api.py), composed with search over exports and runs
(worker/search_sets.py) where numpy and pyarrow are installed (`dualstream[search]`, or the
worker extra). Without them `POST /v1/search` answers 501, naming the extra; the rest of the API
is the same. The API never loads a model: workers embed the queries."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from schemas.settings import Settings

if TYPE_CHECKING:  # FastAPI is imported when the API is served, not for every command
    from producer.api import ASGIApp
    from producer.client import Client
    from producer.search import Searcher

# Top-level modules that search needs and a producer's install lacks.
SEARCH_EXTRA_MODULES = frozenset({"numpy", "pyarrow"})


def searcher(settings: Settings, client: Client) -> Searcher | None:
    """Search over exports and runs, or None where the search extra is not installed."""
    try:
        from worker.search_sets import ExportSearcher
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SEARCH_EXTRA_MODULES:
            raise
        return None
    return ExportSearcher(settings, client.redis)


def api_app(settings: Settings, client: Client | None = None) -> ASGIApp:
    """What `dualstream api` serves: the API behind its body limit, with search if it can."""
    from producer.api import wrapped
    from producer.client import Client

    client = client or Client(settings)
    return wrapped(settings, client, searcher(settings, client))


@click.command()
@click.option("--host", default=None, help="address to bind (default: DUALSTREAM_API_HOST)")
@click.option("--port", type=int, default=None, help="port (default: DUALSTREAM_API_PORT)")
def api(host: str | None, port: int | None) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json), with POST /v1/search where numpy and
    pyarrow are installed."""
    import uvicorn

    settings = Settings()
    if settings.api_token is None and settings.api_require_token:
        raise click.UsageError("set DUALSTREAM_API_TOKEN (or DUALSTREAM_API_REQUIRE_TOKEN=false "
                               "to serve without one, on a trusted network only)")
    uvicorn.run(api_app(settings), host=host or settings.api_host,
                port=port or settings.api_port, log_level="info", access_log=False)
