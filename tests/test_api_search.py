"""`POST /v1/search` over real HTTP (uvicorn), as `dualstream api` composes it, against a real
Redis and a real worker that embeds the queries: over an export and over a run, where the answer
is known (an image's duplicate; what `ExportIndex.search` finds for the same text embedding)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from control.objects import LocalOutputStore, S3OutputStore, output_store
from dualstream.serve import api_app
from producer.api import wrapped
from schemas.keys import RedisKeys
from schemas.settings import Settings
from tests.fixtures.services import WorkerProcess, dualstream, spawn_worker, worker_env
from tests.images import jpeg_bytes
from tests.test_api import TOKEN, call, serve
from worker.export import export_run
from worker.local import RedisServer
from worker.search import ExportIndex

pytestmark = pytest.mark.timeout(600)


@dataclass
class Served:
    """One worker, one bulk run over seven images (img002 twice) and its export, the API."""

    base: str
    root: Path
    settings: Settings
    run_id: str
    export: Path
    photos: Path
    workers: list[WorkerProcess]

    def search(self, token: str | None = TOKEN, **body: Any) -> tuple[int, Any]:
        status, answer, _ = call(f"{self.base}/v1/search", "POST", body, token=token)
        return status, answer

    def query_file(self, name: str, data: bytes) -> str:
        path = self.root / "queries" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        return str(path)


def _bulk_run(settings: Settings, photos: Path) -> str:
    env = worker_env(redis_url=settings.redis_dsn, model=settings.model,
                     output_uri=settings.output_uri, local_root=settings.local_root)
    line = dualstream(env, "bulk", str(photos), "--per-message", "2", "--wait")
    return line.split()[1].rstrip(":")


@pytest.fixture(scope="module")
def served(redis_server: RedisServer, s3_endpoint: str, tiny_model_dirs: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    redis.Redis(port=redis_server.port).flushall()
    root = tmp_path_factory.mktemp("search").resolve()
    photos = root / "photos"
    photos.mkdir()
    for i in range(6):
        (photos / f"img{i:03d}.jpg").write_bytes(jpeg_bytes(i))
    (photos / "twin-of-img002.jpg").write_bytes(jpeg_bytes(2))
    settings = Settings(redis_url=redis_server.url, model=tiny_model_dirs["openclip"],
                        output_uri=f"file://{root}/out", local_root=str(root),
                        s3_endpoint_url=s3_endpoint, api_token=TOKEN, search_timeout_s=60)
    workers: list[WorkerProcess] = []
    try:
        spawn_worker(root / "worker.log", workers, redis_url=settings.redis_dsn,
                     model=settings.model, output_uri=settings.output_uri,
                     local_root=settings.local_root, max_batch_items=3)
        run_id = _bulk_run(settings, photos)
        export = root / "export"
        summary = export_run(run_id, output_store(settings), LocalOutputStore(str(export)),
                             client=redis.Redis(port=redis_server.port), keys=RedisKeys(),
                             rows_per_file=4)
        assert summary.rows == {"image": 7}
        server = serve(settings, app=api_app(settings))
        yield Served(next(server), root, settings, run_id, export, photos, workers)
        next(server, None)
    finally:
        for worker in workers:
            worker.stop()


def _hits(answer: dict[str, Any]) -> list[tuple[str, float]]:
    return [(hit["job_id"], hit["score"]) for hit in answer["hits"]]


def test_an_image_query_over_http_finds_the_image_and_its_duplicate_first(
        served: Served) -> None:
    query = served.query_file("copy-of-img002.jpg", jpeg_bytes(2))
    status, answer = served.search(export=str(served.export), image=query, k=3)
    assert status == 200, answer
    twins = {str(served.photos / "img002.jpg"), str(served.photos / "twin-of-img002.jpg")}
    assert {hit["source"] for hit in answer["hits"][:2]} == twins
    scores = [hit["score"] for hit in answer["hits"]]
    assert scores[0] > 0.9999 and scores[1] > 0.9999 > scores[2]
    assert answer["rows"] == 7 and answer["model"]
    assert call(f"{served.base}/v1/jobs/{answer['query_job_id']}")[1]["status"] == "done"
    # The run's own file: its bulk job is done without its embedding kept; it runs again.
    status, again = served.search(export=str(served.export),
                                  image=str(served.photos / "img002.jpg"), k=3)
    assert status == 200, again
    assert {hit["source"] for hit in again["hits"][:2]} == twins
    [own] = [hit for hit in again["hits"] if hit["source"].endswith("/img002.jpg")]
    assert own["job_id"] == again["query_job_id"]  # the bulk job itself


def test_a_text_query_finds_what_export_index_finds_for_the_same_text_embedding(
        served: Served) -> None:
    from worker.embed import embed_texts
    from worker.models.loader import load_encoder

    text = "a photo of a red square"
    status, answer = served.search(export=str(served.export), text=text, k=7)
    assert status == 200, answer
    encoder = load_encoder(served.settings.model, device="cpu")
    query = embed_texts(encoder, [text])[0][0].numpy()
    expected = ExportIndex.load(LocalOutputStore(str(served.export))).search(query, 7)
    got = _hits(answer)
    assert [job for job, _ in got] == [hit.job_id for hit in expected]
    assert all(abs(score - hit.score) < 1e-5 for (_, score), hit in zip(got, expected,
                                                                        strict=True))


def test_a_run_is_searched_as_its_export_and_an_s3_export_as_a_folder(
        served: Served, s3: Any, bucket: str) -> None:
    query = served.query_file("copy-of-img004.jpg", jpeg_bytes(4))
    status, by_export = served.search(export=str(served.export), image=query, k=7)
    assert status == 200, by_export
    status, by_run = served.search(run=served.run_id, image=query, k=7)
    assert status == 200, by_run
    assert by_run["hits"] == by_export["hits"] and by_run["rows"] == 7
    assert by_export["hits"][0]["source"] == str(served.photos / "img004.jpg")
    target = S3OutputStore(f"s3://{bucket}/exports/one", s3)
    for key in LocalOutputStore(str(served.export)).list(""):
        target.put(key, (served.export / key).read_bytes())
    status, by_s3 = served.search(export=target.root, image=query, k=7)
    assert status == 200, by_s3
    assert by_s3["hits"] == by_export["hits"]


def test_a_rewritten_export_is_loaded_again(served: Served) -> None:
    copy = served.root / "export-copy"
    shutil.copytree(served.export, copy)
    status, before = served.search(export=str(copy), text="stripes", k=10)
    assert status == 200 and before["rows"] == 7
    (copy / "image" / "embeddings" / "emb_00001.npy").unlink()
    (copy / "image" / "metadata" / "metadata_00001.parquet").unlink()
    status, after = served.search(export=str(copy), text="stripes", k=10)
    assert status == 200 and after["rows"] == 4 and len(after["hits"]) == 4


def test_a_query_job_that_fails_answers_with_its_error_code(served: Served) -> None:
    notes = served.query_file("notes.jpg", b"these are notes, not an image\n" * 4)
    status, answer = served.search(export=str(served.export), image=notes)
    assert status == 422, answer
    assert answer["detail"]["code"] == "not_an_image" and answer["detail"]["job_id"]
    missing = str(served.root / "queries" / "nowhere.jpg")
    status, answer = served.search(export=str(served.export), image=missing)
    assert status == 422 and answer["detail"]["code"] == "source_not_found", answer


def test_bad_requests_are_refused_with_their_field_or_code(served: Served) -> None:
    export = str(served.export)
    assert served.search(token=None, export=export, text="x")[0] == 401
    assert served.search(token="wrong", export=export, text="x")[0] == 401
    for body, kind in (({"export": export}, "search_query"),
                       ({"export": export, "text": "x", "image": "/a.jpg"}, "search_query"),
                       ({"text": "x"}, "search_set"),
                       ({"export": export, "run": served.run_id, "text": "x"}, "search_set")):
        status, answer = served.search(**body)
        assert status == 422 and answer["detail"][0]["type"] == kind, (body, answer)
    status, answer = served.search(export=export, text="x", k=0)
    assert status == 422 and answer["detail"][0]["loc"] == ["body", "k"]
    status, answer = served.search(export=export, text="   ")
    assert status == 422 and answer["detail"][0]["type"] == "empty_text"
    status, answer = served.search(export=str(served.root / "no-such-export"), text="x")
    assert status == 404 and answer["detail"]["code"] == "search_set_not_found"
    status, answer = served.search(run="run-unknown", text="x")
    assert status == 404 and answer["detail"]["code"] == "search_set_not_found"


def test_outside_the_search_roots_is_403_no_worker_504_and_without_numpy_501(
        served: Served) -> None:
    rooted = served.settings.model_copy(update={"search_roots": [str(served.root / "other")],
                                                "search_timeout_s": 1})
    with_roots = serve(rooted, app=api_app(rooted))
    base = next(with_roots)
    try:
        status, answer, _ = call(f"{base}/v1/search", "POST",
                                 {"export": str(served.export), "text": "x"})
        assert status == 403 and answer["detail"]["code"] == "search_set_not_allowed"
        status, answer, _ = call(f"{base}/v1/search", "POST",
                                 {"export": str(served.root / "other" / "none"), "text": "x"})
        assert status == 404, answer  # inside the roots, but nothing there
    finally:
        next(with_roots, None)
    impatient = served.settings.model_copy(update={"search_timeout_s": 1})
    unserved = serve(impatient, app=api_app(impatient))
    base = next(unserved)
    try:
        status, answer, _ = call(f"{base}/v1/search", "POST", {
            "export": str(served.export), "text": "x", "model": "tiny/served-by-no-worker"})
        assert status == 504 and answer["detail"]["code"] == "search_query_timeout", answer
    finally:
        next(unserved, None)
    without = serve(served.settings, app=wrapped(served.settings))  # no searcher
    base = next(without)
    try:
        status, answer, _ = call(f"{base}/v1/search", "POST",
                                 {"export": str(served.export), "text": "x"})
        assert status == 501 and "dualstream[search]" in answer["detail"]["message"]
    finally:
        next(without, None)


def test_a_chinese_query_goes_through_on_altclip(
        served: Served, tiny_model_dirs: dict[str, str]) -> None:
    from worker.embed import embed_texts
    from worker.models.loader import load_encoder

    model = tiny_model_dirs["altclip"]
    settings = served.settings.model_copy(update={"model": model})
    spawn_worker(served.root / "worker-altclip.log", served.workers,
                 redis_url=settings.redis_dsn, model=model, output_uri=settings.output_uri,
                 local_root=settings.local_root)
    run_id = _bulk_run(settings, served.photos)
    status, answer = served.search(run=run_id, text="一只猫", model=model, k=7)
    assert status == 200, answer
    encoder = load_encoder(model, device="cpu")
    query = embed_texts(encoder, ["一只猫"])[0][0].numpy()
    export = served.root / "export-altclip"
    export_run(run_id, output_store(settings), LocalOutputStore(str(export)),
               client=redis.Redis.from_url(settings.redis_dsn), keys=RedisKeys())
    expected = ExportIndex.load(LocalOutputStore(str(export))).search(query, 7)
    got = _hits(answer)
    assert [job for job, _ in got] == [hit.job_id for hit in expected]
    assert all(abs(score - hit.score) < 1e-5 for (_, score), hit in zip(got, expected,
                                                                        strict=True))
