"""Object versions and keys end to end: a job reads exactly the object version it names, and
every key S3 allows reaches the output row byte for byte (moto over HTTP, real workers)."""

from __future__ import annotations

import io
import subprocess
import sys
import uuid
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from control.objects import S3Location
from producer.client import Client
from schemas.errors import ErrorCode, SourceError
from schemas.jobs import Job, Task
from schemas.keys import ShardPaths
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.services import REPO, worker_env
from tests.images import jpeg_bytes
from worker.embed import embed_images
from worker.sources import SourceReader

pytestmark = pytest.mark.timeout(600)
FAMILY = "openclip"

# Keys S3 allows that a URL parser would change: query and fragment marks, percent and plus
# signs, spaces, a leading slash, doubled and trailing-segment slashes, a newline, NFD and CJK.
AWKWARD_KEYS = [
    "/leading-slash.jpg",
    "q/what?x=1&y=2.jpg",
    "q/frag#ment.jpg",
    "q/100% real+plus.jpg",
    "q/ spaced  out .jpg",
    "q//double//slash.jpg",
    "q/cafe\u0301 NFD.jpg",
    "q/猫の写真.jpg",
    "q/" + "k" * 1016 + ".jpg",  # 1,024 bytes
]
# moto's server answers 404 to a PUT of a key with a newline, so that one is only parsed here.
PARSED_ONLY = ["q/new\nline.jpg", "q/tab\there.jpg", "trailing space.jpg ", "q/"]


@pytest.fixture
def versioned_bucket(s3: Any) -> str:
    name = f"versions-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def put(s3: Any, bucket: str, key: str, body: bytes) -> tuple[str, str]:
    response = s3.put_object(Bucket=bucket, Key=key, Body=body)
    return response["VersionId"], response["ETag"].strip('"')


def metadata_rows(s3: Any, bucket: str, model: str) -> list[dict[str, Any]]:
    prefix = f"embeddings/{ShardPaths(model, 'image').directory}/"
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    rows: list[dict[str, Any]] = []
    for item in listing:
        if item["Key"].endswith(".parquet"):
            body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            rows += pq.read_table(io.BytesIO(body)).to_pylist()
    return rows


def test_an_s3_uri_keeps_its_key_byte_for_byte() -> None:
    for key in AWKWARD_KEYS + PARSED_ONLY:
        location = S3Location.parse(f"s3://bucket-1/{key}")
        assert (location.bucket, location.key) == ("bucket-1", key)


def test_a_versioned_read_gets_that_version_and_a_changed_etag_is_refused(
        s3: Any, s3_endpoint: str, versioned_bucket: str) -> None:
    reader = SourceReader(Settings(redis_url="redis://unused", s3_endpoint_url=s3_endpoint), s3)
    uri = f"s3://{versioned_bucket}/cat.jpg"
    first, first_etag = put(s3, versioned_bucket, "cat.jpg", b"first bytes")
    second, _ = put(s3, versioned_bucket, "cat.jpg", b"second bytes, longer")
    assert reader.read(uri, version=first).data == b"first bytes"
    assert reader.read(uri, version=second).data == b"second bytes, longer"
    assert reader.read(uri, version=first, etag=first_etag).etag == first_etag
    assert reader.read(uri).data == b"second bytes, longer"
    cases = {
        ErrorCode.SOURCE_CHANGED: lambda: reader.read(uri, etag=first_etag),  # overwritten
        ErrorCode.SOURCE_NOT_FOUND: lambda: reader.read(uri, version="no-such-version"),
        ErrorCode.INVALID_JOB: lambda: reader.read("http://example.com/a.jpg", version=first),
    }
    for code, read in cases.items():
        with pytest.raises(SourceError) as raised:
            read()
        assert raised.value.code is code, code


def test_each_version_of_an_object_is_read_by_its_own_job(
        start_worker: Any, s3: Any, s3_endpoint: str, redis_url: str, versioned_bucket: str,
        tiny_model_dirs: dict[str, str], tiny_encoders: Any) -> None:
    """Two versions uploaded before any worker runs: each job gets its version's pixels,
    and its row names the version and that version's ETag."""
    model = tiny_model_dirs[FAMILY]
    settings = Settings(redis_url=redis_url, s3_endpoint_url=s3_endpoint, model=model,
                        output_uri=f"s3://{versioned_bucket}/embeddings")
    bodies = [jpeg_bytes(1), jpeg_bytes(2)]
    versions = [put(s3, versioned_bucket, "photo.jpg", body) for body in bodies]
    uri = f"s3://{versioned_bucket}/photo.jpg"
    jobs = [Job(task=Task.IMAGE_EMBEDDING, image=uri, model=model, version=version, etag=etag)
            for version, etag in versions]
    client = Client(settings)
    ids = client.submit_many(jobs, per_message=2)
    start_worker(redis_url=settings.redis_dsn, s3_endpoint_url=s3_endpoint, model=model,
                 output_uri=settings.output_uri)
    assert [r.status for r in client.wait(ids, timeout=180)] == [Status.DONE, Status.DONE]
    rows = {row["job_id"]: row for row in metadata_rows(s3, versioned_bucket, model)}
    direct = embed_images(tiny_encoders[FAMILY], bodies).numpy()
    for job_id, (version, etag), expected in zip(ids, versions, direct, strict=True):
        assert (rows[job_id]["version"], rows[job_id]["etag"]) == (version, etag)
        stored = client.result(job_id).embedding
        assert stored is not None
        np.testing.assert_allclose(np.asarray(stored), expected, atol=1e-5)


def test_every_key_s3_allows_reaches_its_row_byte_for_byte(
        start_worker: Any, s3: Any, s3_endpoint: str, redis_url: str, bucket: str,
        tiny_model_dirs: dict[str, str]) -> None:
    """Listed by `dualstream bulk`, read by a worker, named exactly in the output rows."""
    model = tiny_model_dirs[FAMILY]
    source_bucket = f"keys-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=source_bucket)
    for i, key in enumerate(AWKWARD_KEYS):
        assert len(key.encode()) <= 1024
        s3.put_object(Bucket=source_bucket, Key=key, Body=jpeg_bytes(i))
    env = worker_env(redis_url=redis_url, s3_endpoint_url=s3_endpoint, model=model)
    start_worker(redis_url=redis_url, s3_endpoint_url=s3_endpoint, model=model,
                 output_uri=f"s3://{bucket}/embeddings")
    cli = subprocess.run(
        [sys.executable, "-m", "dualstream.cli", "bulk", f"s3://{source_bucket}/",
         "--wait"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    rows = metadata_rows(s3, bucket, model)
    assert sorted(row["source"] for row in rows) == sorted(
        f"s3://{source_bucket}/{key}" for key in AWKWARD_KEYS)
