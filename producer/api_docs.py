"""docs/api.md, made from the API's own OpenAPI document so the two cannot drift apart:
`python -m producer.api_docs > docs/api.md` (tests/test_api_docs.py checks it is current)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import SecretStr

from producer.api import create_app
from producer.client import Client
from schemas.settings import Settings

_INTRO = """# The HTTP API

Generated from the OpenAPI document by `python -m producer.api_docs`; do not edit by hand.
`dualstream api` serves it (default `127.0.0.1:8080`), with the document itself at
`/openapi.json` and an interactive page at `/docs`. Every `/v1` route but the scaling one
needs `Authorization: Bearer $DUALSTREAM_API_TOKEN`; the event routes take the webhook's token
(`DUALSTREAM_WEBHOOK_TOKEN`, or the API token), as a bearer token or a basic-auth password.

A body over `DUALSTREAM_API_MAX_BODY_BYTES` is refused with 413 before it is read; an invalid
job with 422, naming the field (`detail[].loc`) and the error code (`detail[].type`, e.g.
`empty_text`); a submission to a model whose backlog (jobs queued and held) reaches
`DUALSTREAM_API_MAX_BACKLOG_JOBS` with 429 and `Retry-After`; one to a model no worker has
announced with 409 when `DUALSTREAM_UNSERVED_MODELS=refuse` (else it is accepted with a warning).

`POST /v1/search` embeds its query as a job on the model's queue (a worker must serve the model)
and searches an export or a run's committed rows in the API's process. Its refusals carry
`detail.code`: `search_set_not_found` (404), `search_set_not_allowed` (403, outside
`DUALSTREAM_SEARCH_ROOTS`), `search_set_unreadable` and `search_wrong_dimension` (422),
`search_no_model` (422), `search_storage_unavailable` (503), `search_query_timeout` (504, after
`DUALSTREAM_SEARCH_TIMEOUT_S`), `search_not_available` (501: an API installed without numpy and
pyarrow, `pip install 'dualstream[search]'`); a query job that failed answers 422 with the
job's own error code (502 for a failure on the service's side: `internal_error`, transient ones).
"""


def markdown(openapi: dict[str, Any]) -> str:
    lines = [_INTRO]
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            lines.append(f"## `{method.upper()} {path}`\n")
            lines.append(f"{operation.get('summary', '')}\n")
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {})
                pattern = f", pattern `{schema['pattern']}`" if "pattern" in schema else ""
                lines.append(f"- {parameter['in']} `{parameter['name']}`: "
                             f"{schema.get('type', 'string')}{pattern}"
                             f"{' (required)' if parameter.get('required') else ''}")
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body:
                lines.append(f"- body: `{_name(body['schema'])}`")
            for status, response in sorted(operation.get("responses", {}).items()):
                content = response.get("content", {}).get("application/json", {})
                shape = f" `{_name(content['schema'])}`" if content.get("schema") else ""
                lines.append(f"- {status}: {response.get('description', '')}{shape}")
            lines.append("")
    lines.append("## Schemas\n")
    for name, schema in sorted(openapi["components"]["schemas"].items()):
        lines.append(f"### `{name}`\n")
        lines.append("```json")
        lines.append(json.dumps(schema, indent=2, sort_keys=True))
        lines.append("```\n")
    return "\n".join(lines)


def _name(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if schema.get("type") == "array":
        return f"array of {_name(schema.get('items', {}))}"
    return str(schema.get("type", "object"))


def current() -> str:
    settings = Settings(redis_url=SecretStr("redis://127.0.0.1:1/0"))  # never connected to
    return markdown(create_app(settings, Client(settings)).openapi())


if __name__ == "__main__":
    print(current(), end="")
