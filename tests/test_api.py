"""The HTTP API over real HTTP (uvicorn), against a real Redis and, where jobs must finish, a
real worker; and schemathesis against the API's own OpenAPI document."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from dualstream.serve import api_app
from producer.api import wrapped
from schemas.keys import canonical_model
from schemas.settings import Settings
from tests.fixtures.services import REPO, free_port, worker_env

pytestmark = pytest.mark.timeout(600)
TOKEN = "api-t0ken"
MODEL = "tiny/unserved"


def serve(settings: Settings, port: int | None = None, app: Any = None) -> Iterator[str]:
    """The API (`app`, or the producer's API for `settings`) on `port` (a free one by default):
    yields its base URL, then stops it."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app or wrapped(settings), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def api(redis_url: str) -> Callable[..., str]:
    """Start an API with these settings (a token and a small body limit unless overridden)."""
    servers: list[Iterator[str]] = []

    def start(**overrides: Any) -> str:
        fields: dict[str, Any] = {"redis_url": redis_url, "api_token": TOKEN,
                                  "api_max_body_bytes": 4096, **overrides}
        running = serve(Settings(**fields))
        servers.append(running)
        return next(running)

    yield start
    for running in servers:
        next(running, None)


def call(url: str, method: str = "GET", body: Any = None, token: str | None = TOKEN,
         headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, _payload(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, _payload(error.read()), error.headers


def _payload(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def text_job(text: str = "a red square", model: str = MODEL) -> dict[str, Any]:
    return {"task": "text_embedding", "text": text, "model": model}


def test_every_v1_route_but_scaling_needs_the_token(api: Callable[..., str]) -> None:
    base = api()
    assert call(f"{base}/v1/jobs", "POST", text_job(), token=None)[0] == 401
    assert call(f"{base}/v1/jobs", "POST", text_job(), token="wrong")[0] == 401
    assert call(f"{base}/v1/models", token=None)[0] == 401
    assert call(f"{base}/v1/events/minio", "POST", {}, token=None)[0] == 401
    status, scaling, _ = call(f"{base}/v1/models/dualstream.x-1/scaling", token=None)
    assert status == 200 and scaling["jobs"] == 0
    assert call(f"{base}/healthz", token=None)[0] == 200


def test_an_invalid_job_is_422_naming_its_field_and_an_unknown_job_404(
        api: Callable[..., str]) -> None:
    base = api()
    status, answer, _ = call(f"{base}/v1/jobs", "POST", text_job(text="   "))
    assert status == 422 and any("text" in json.dumps(e) or "empty_text" in json.dumps(e)
                                 for e in answer["detail"])
    status, answer, _ = call(f"{base}/v1/jobs", "POST", {"task": "zero_shot", "model": MODEL,
                                                          "image": "s3://b/k.jpg"})
    assert status == 422
    assert call(f"{base}/v1/jobs/{'0' * 32}")[0] == 404
    assert call(f"{base}/v1/jobs/not-an-id")[0] == 422


def test_a_body_over_the_limit_is_413_before_it_is_read(api: Callable[..., str]) -> None:
    base = api()
    host, port = base.removeprefix("http://").split(":")
    huge = text_job(text="x" * 10_000)
    assert call(f"{base}/v1/jobs", "POST", huge)[0] == 413
    for head in (f"Content-Length: {10**12}", "Content-Length: -1"):
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}"
                        f"\r\n{head}\r\nContent-Type: application/json\r\n\r\n".encode())
            assert raw.recv(100).split()[1] in (b"413", b"400"), head
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                    "Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
                    .encode())
        for _ in range(3):
            raw.sendall(b"800\r\n" + b" " * 0x800 + b"\r\n")
        raw.sendall(b"0\r\n\r\n")
        assert raw.recv(100).split()[1] == b"413"


def test_a_backlog_over_the_bound_is_429_and_an_unserved_model_refused_or_warned(
        api: Callable[..., str]) -> None:
    warned = api(api_max_backlog_jobs=2, unserved_models="warn")
    status, answer, _ = call(f"{warned}/v1/jobs/batch", "POST",
                             {"jobs": [text_job("one"), text_job("two")]})
    assert status == 202 and len(answer["job_ids"]) == 2
    assert answer["warnings"] and "no worker has served" in answer["warnings"][0]
    status, _, headers = call(f"{warned}/v1/jobs", "POST", text_job("three"))
    assert status == 429 and int(headers["Retry-After"]) > 0
    refused = api(unserved_models="refuse")
    status, answer, _ = call(f"{refused}/v1/jobs", "POST", text_job(model="other/model"))
    assert status == 409 and "served: none" in answer["detail"]


def test_a_job_submitted_over_http_is_finished_by_a_real_worker(
        api: Callable[..., str], start_worker: Any, redis_url: str,
        tiny_model_dirs: dict[str, str]) -> None:
    model = tiny_model_dirs["openclip"]
    start_worker(redis_url=redis_url, model=model)
    base = api(unserved_models="refuse")
    status, answer, _ = call(f"{base}/v1/jobs", "POST", text_job(model=model))
    assert status == 202 and answer["warning"] is None
    job_id = answer["job_id"]
    deadline = time.monotonic() + 120
    while (result := call(f"{base}/v1/jobs/{job_id}")[1])["status"] != "done":
        assert time.monotonic() < deadline, result
        time.sleep(0.2)
    assert result["embedding_dim"] == len(result["embedding"])
    status, _, _ = call(f"{base}/v1/jobs/batch", "POST",
                            {"jobs": [text_job("one", model), text_job("two", model)],
                             "run_id": "api-run"})
    assert status == 202
    while (run := call(f"{base}/v1/runs/api-run")[1])["done"] < 2:
        assert time.monotonic() < deadline, run
        time.sleep(0.2)
    [served] = call(f"{base}/v1/models")[1]
    assert served["model"] == model and served["workers"]
    # Another spelling of the same model lands on the same queue and the same worker.
    other = canonical_model(model) + "/"
    assert other != model
    status, answer, _ = call(f"{base}/v1/jobs", "POST", text_job("spelt otherwise", other))
    assert status == 202 and answer["queue"] == served["queue"]
    while call(f"{base}/v1/jobs/{answer['job_id']}")[1]["status"] != "done":
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_schemathesis_finds_no_server_error(redis_url: str, tmp_path: Path) -> None:
    """The API as `dualstream api` serves it, search included; searches are confined to an
    empty folder, so that no generated path makes the API list this machine's files."""
    settings = Settings(redis_url=redis_url, api_token=TOKEN, api_max_body_bytes=4096,
                        unserved_models="warn", search_roots=[str(tmp_path)])
    running = serve(settings, app=api_app(settings))
    base = next(running)
    try:
        run = subprocess.run(
            [str(REPO / ".venv" / "bin" / "schemathesis"), "run", f"{base}/openapi.json",
             "--checks", "not_a_server_error", "--header", f"Authorization: Bearer {TOKEN}",
             "--max-examples", "25", "--workers", "1"],
            cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=400)
    finally:
        next(running, None)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
