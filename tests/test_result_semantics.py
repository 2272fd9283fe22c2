"""Results mean what a user expects: a failed job submitted again runs again and `--wait` waits
for its new outcome; a local file edited in place is a new job; `--force` runs a done job
again; a local job whose file changed since fails `source_changed` (real worker processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import NoCredentialsError

from producer.bulk import source_etag
from producer.client import Client
from schemas.errors import ErrorCode, SourceError
from schemas.jobs import Job, Task, ZeroShotOptions
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.services import REPO, worker_env
from tests.images import jpeg_bytes
from worker.sources import SourceReader

pytestmark = pytest.mark.timeout(600)


def dualstream(*args: str, **settings: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dualstream.cli", *args],
                          env=worker_env(**settings), cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_a_failed_job_submitted_again_after_its_fix_waits_for_the_new_result_and_force_reruns(
        start_worker: Any, redis_url: str, s3_endpoint: str, s3: Any, bucket: str,
        tiny_model_dirs: dict[str, str]) -> None:
    model = tiny_model_dirs["openclip"]
    settings = {"redis_url": redis_url, "s3_endpoint_url": s3_endpoint, "model": model}
    start_worker(**settings, output_uri=f"s3://{bucket}/embeddings")
    s3.put_object(Bucket=bucket, Key="photos/a.jpg", Body=b"not an image at all")
    args = ["submit", "--image", f"s3://{bucket}/photos/a.jpg", "--wait", "120"]

    failed = dualstream(*args, **settings)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert json.loads(failed.stdout)["status"] == "failed"
    [line] = failed.stderr.strip().splitlines()
    assert line.startswith("Error: job ") and "[not_an_image]" in line

    s3.put_object(Bucket=bucket, Key="photos/a.jpg", Body=jpeg_bytes(3))
    fixed = dualstream(*args, **settings)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    first = json.loads(fixed.stdout)
    assert first["status"] == "done" and first["job_id"] == json.loads(failed.stdout)["job_id"]
    embedding_lines = [x for x in fixed.stdout.splitlines() if '"embedding":' in x]
    assert len(embedding_lines) == 1 and len(first["embedding"]) == first["embedding_dim"]

    again = dualstream(*args, **settings)  # done: not run again, the same row
    assert json.loads(again.stdout)["output"] == first["output"]
    forced = dualstream(*args, "--force", **settings)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    rerun = json.loads(forced.stdout)
    assert rerun["status"] == "done" and rerun["output"]["shard"] != first["output"]["shard"]


def test_a_local_file_edited_in_place_is_a_new_job_and_bulk_reports_failures(
        start_worker: Any, redis_url: str, tmp_path: Path,
        tiny_model_dirs: dict[str, str]) -> None:
    model = tiny_model_dirs["openclip"]
    folder = tmp_path / "images"
    folder.mkdir()
    image = folder / "a.jpg"
    image.write_bytes(jpeg_bytes(1))
    (folder / "b.jpg").write_bytes(jpeg_bytes(2))
    (folder / "broken.jpg").write_bytes(b"no image")
    start_worker(redis_url=redis_url, model=model, local_root=str(folder),
                 output_uri=(tmp_path / "out").as_uri())
    client = Client(Settings(redis_url=redis_url, model=model))

    before = client.result(client.embed_image(str(image)), timeout=120)
    old_etag = source_etag(str(image))
    image.write_bytes(jpeg_bytes(5))
    os.utime(image, ns=(1_000_000_000, 1_000_000_000))  # whatever the clock's resolution
    after = client.result(client.embed_image(str(image)), timeout=120)
    assert before.status is after.status is Status.DONE
    assert after.job_id != before.job_id and after.embedding != before.embedding

    stale = Job(task=Task.ZERO_SHOT, image=str(image), model=model, etag=old_etag,
                zero_shot=ZeroShotOptions(labels=["cat", "dog"]))  # made before the edit
    changed = client.result(client.submit(stale), timeout=120)
    assert changed.error is not None and changed.error.code is ErrorCode.SOURCE_CHANGED

    run = dualstream("bulk", str(folder), "--wait", redis_url=redis_url, model=model)
    assert run.returncode == 1, run.stdout + run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    # a.jpg as it is now was done by hand already: not sent again, not counted
    assert (summary["queued"], summary["done"], summary["failed"]) == (2, 1, 1)
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"Error: run {summary['run']}: 1 of 2 jobs failed (not_an_image 1)")

    forced = dualstream("bulk", str(folder), "--wait", "--force", redis_url=redis_url,
                        model=model)
    summary = json.loads(forced.stdout.strip().splitlines()[-1])
    # every job sent again: the done ones counted again, the failed one still failed once
    assert (summary["queued"], summary["done"], summary["failed"]) == (4, 3, 1), summary
    manifests = list((tmp_path / "out").rglob("*.json"))
    rows = sum(len(json.loads(m.read_text())["jobs"]) for m in manifests)
    assert rows == 2 + 1 + 2  # a.jpg twice by hand, b.jpg, then both again, forced


def test_local_sources_check_their_identity_and_name_local_root(tmp_path: Path) -> None:
    image = tmp_path / "a.jpg"
    image.write_bytes(b"bytes")
    reader = SourceReader(Settings(local_root=str(tmp_path)))
    assert reader.read(str(image), etag=source_etag(str(image))).etag == source_etag(str(image))
    with pytest.raises(SourceError) as changed:
        reader.read(str(image), etag="1-1")
    assert changed.value.code is ErrorCode.SOURCE_CHANGED
    with pytest.raises(SourceError) as no_root:
        SourceReader(Settings()).read(str(image))
    assert no_root.value.code is ErrorCode.SOURCE_NOT_ALLOWED
    assert "DUALSTREAM_LOCAL_ROOT" in no_root.value.message


def test_missing_aws_credentials_fail_the_job_at_once_and_say_which(tmp_path: Path) -> None:
    class NoCredentials:
        def get_object(self, **_: object) -> None:
            raise NoCredentialsError

    with pytest.raises(SourceError) as denied:
        SourceReader(Settings(), s3=NoCredentials()).read("s3://bucket/a.jpg")
    assert denied.value.code is ErrorCode.ACCESS_DENIED
    assert "AWS_ACCESS_KEY_ID" in denied.value.message
