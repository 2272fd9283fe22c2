"""Bad inputs, end to end through a real worker: each gets its documented outcome (a failed
result with a stable code, a dead letter with a stable code, or a documented conversion), the
worker never crashes, and every good batch-mate completes.

Sources are read through `FaultProxy` (with no faults) so that the bytes S3 sends for an
object over the byte limit can be counted. Access denied is a real 403 from moto: IAM is
enforced for the test, and the worker's user may not read one bucket.
"""

from __future__ import annotations

import contextlib
import io
import json
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image, ImageOps

from control.deadletters import DeadLetter, DeadLetterStore
from producer.client import Client
from schemas.errors import ErrorCode
from schemas.jobs import MAX_TEXT_CHARS, Job, JobMessage, Task, ZeroShotOptions
from schemas.keys import TASK_NAME, RedisKeys, queue_name
from schemas.results import JobResult, Status
from schemas.settings import Settings
from tests.fixtures.bad_images import bad_image_corpus, convertible_image_corpus
from tests.fixtures.faults import (
    FaultProxy,
    celery_message,
    held_messages,
    wait_for,
    worker_launcher,
)
from tests.images import jpeg_bytes
from worker.embed import embed_images

pytestmark = pytest.mark.timeout(300)
_ = worker_launcher  # a fixture

MAX_IMAGE_BYTES = 2 * 1024 * 1024
OVERSIZED_BYTES = 24 * 1024 * 1024
CONVERSIONS = ("jpeg_cmyk", "png_16bit_gray", "png_palette", "png_rgba", "png_la",
               "png_rgba_hidden_colour", "jpeg_exif_orientation_6", "gif_two_frames",
               "webp_two_frames", "apng_two_frames", "tiff_two_pages", "tiff_lzw")


@contextlib.contextmanager
def iam_enforced(endpoint: str, denied_bucket: str) -> Iterator[dict[str, str]]:
    """Credentials of a user who may do anything on S3 but read `denied_bucket`; moto checks
    every request against IAM until the block ends."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    user = f"worker-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="worker", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:GetObject",
             "Resource": f"arn:aws:s3:::{denied_bucket}/*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]

    def set_auth(count: str) -> str:
        request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth",
                                         data=count.encode(), method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request) as response:
            return str(json.load(response)["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"])

    previous = set_auth("0")
    try:
        yield {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        set_auth(previous)


@dataclass
class Case:
    name: str
    expect: str  # "done", or an ErrorCode value
    job_id: str | None = None  # None: no job id can be derived; expect a dead letter
    message_id: str | None = None


def reference_rgb(data: bytes) -> Image.Image:
    """The documented conversion, done here without decode.py: transformers' `load_image`
    (EXIF orientation, then Pillow's convert("RGB"), which drops alpha) of the first frame."""
    image = Image.open(io.BytesIO(data))
    image.seek(0)
    return ImageOps.exif_transpose(image).convert("RGB")


@dataclass
class Corpus:
    """Submits the inputs and remembers what each should come to."""

    client: Client
    model: str
    bucket: str
    good: list[str]
    cases: list[Case] = field(default_factory=list)

    @property
    def queue(self) -> str:
        return queue_name(self.model)

    def send(self, payload: Any) -> str:
        """A message as a producer in another language might send it: unchecked."""
        return str(self.client.app.send_task(TASK_NAME, args=[payload], queue=self.queue).id)

    def mate(self, tag: str) -> dict[str, Any]:
        """A good job to share a message with a bad one."""
        job = Job(task=Task.IMAGE_EMBEDDING, image=self.good[0], model=self.model,
                  idempotency_key=tag)
        self.cases.append(Case(f"batch-mate of {tag}", "done", job.job_id))
        return job.model_dump(mode="json")

    def sources(self, sources: dict[str, tuple[str, str]]) -> None:
        """Image jobs, each with a good batch-mate, eight jobs to a message."""
        jobs: list[Job] = []
        for i, (name, (uri, code)) in enumerate(sources.items()):
            job = Job(task=Task.IMAGE_EMBEDDING, image=uri, model=self.model)
            self.cases.append(Case(name, str(code), job.job_id))
            jobs += [job, Job(task=Task.IMAGE_EMBEDDING, image=self.good[i % len(self.good)],
                              model=self.model, idempotency_key=name)]
            self.cases.append(Case(f"batch-mate of {name}", "done", jobs[-1].job_id))
        self.client.submit_many(jobs, per_message=8)

    def invalid_jobs(self, jobs: dict[str, tuple[Any, ErrorCode]]) -> None:
        for name, (raw, code) in jobs.items():
            self.cases.append(Case(name, code.value,
                                   message_id=self.send({"jobs": [self.mate(name), raw]})))

    def invalid_messages(self, payloads: dict[str, Any], bodies: dict[str, bytes],
                         broker: redis.Redis) -> None:
        for name, payload in payloads.items():
            self.cases.append(Case(name, ErrorCode.INVALID_JOB.value,
                                   message_id=self.send(payload)))
        for name, body in bodies.items():
            message_id = str(uuid.uuid4())
            broker.lpush(self.queue, celery_message([], queue=self.queue, body=body,
                                                    message_id=message_id))
            self.cases.append(Case(name, ErrorCode.INVALID_JOB.value, message_id=message_id))

    def valid(self, jobs: dict[str, tuple[Job, str]], *, raw: bool = False) -> None:
        for name, (job, expect) in jobs.items():
            if raw:
                self.send(JobMessage(jobs=[job]).model_dump(mode="json"))
            self.cases.append(Case(name, expect, job.job_id))
        if not raw:
            self.client.submit_many([job for job, _ in jobs.values()], per_message=len(jobs))


def upload_images(s3: Any, bucket: str) -> dict[str, tuple[bytes, str]]:
    images: dict[str, tuple[bytes, str]] = {
        name: (data, code) for name, data, code in bad_image_corpus()}
    convertible = dict(convertible_image_corpus())
    images |= {name: (convertible[name], "done") for name in CONVERSIONS}
    images["over_byte_limit"] = (jpeg_bytes(3) + bytes(OVERSIZED_BYTES),
                                 ErrorCode.SOURCE_TOO_LARGE.value)
    for name, (data, _) in images.items():
        s3.put_object(Bucket=bucket, Key=f"corpus/{name}", Body=data)
    return images


def invalid_jobs(model: str, good: list[str]) -> dict[str, tuple[Any, ErrorCode]]:
    """Jobs that do not validate; the client refuses to build them, so they are sent raw."""
    text = {"task": "text_embedding", "model": model}
    labels = {"task": "zero_shot", "model": model, "image": good[1]}
    return {
        "empty_labels": ({**labels, "zero_shot": {"labels": []}}, ErrorCode.EMPTY_LABELS),
        "blank_label": ({**labels, "zero_shot": {"labels": ["cat", " "]}},
                        ErrorCode.EMPTY_LABELS),
        "10000_labels": ({**labels, "zero_shot": {"labels": [f"l{i}" for i in range(10_000)]}},
                         ErrorCode.TOO_MANY_LABELS),
        "empty_text": ({**text, "text": ""}, ErrorCode.EMPTY_TEXT),
        "blank_text": ({**text, "text": " \n\t "}, ErrorCode.EMPTY_TEXT),
        "text_over_max_chars": ({**text, "text": "x" * (MAX_TEXT_CHARS + 1)},
                                ErrorCode.INVALID_TEXT),
        "text_lone_surrogate": ({**text, "text": "caf\udce9"}, ErrorCode.INVALID_TEXT),
        "text_not_a_string": ({**text, "text": 42}, ErrorCode.INVALID_TEXT),
        "job_missing_task": ({"model": model, "image": good[0]}, ErrorCode.INVALID_JOB),
        "job_unknown_field": ({**text, "text": "a", "priority": 9}, ErrorCode.INVALID_JOB),
        "job_image_and_text": ({**text, "text": "a", "image": good[0]}, ErrorCode.INVALID_JOB),
        "job_unknown_task": ({**text, "task": "segment", "text": "a"}, ErrorCode.INVALID_JOB),
        "job_not_an_object": ("just a string", ErrorCode.INVALID_JOB),
    }


def test_every_bad_input_gets_its_documented_outcome_and_the_worker_survives(
        worker_launcher: Any, redis_url: str, s3_endpoint: str, s3: Any, bucket: str,
        tiny_model_dirs: dict[str, str], tiny_encoders: dict[str, Any], tmp_path: Path) -> None:
    model = tiny_model_dirs["openclip"]
    secret = f"secret-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=secret)
    s3.put_object(Bucket=secret, Key="x.jpg", Body=jpeg_bytes(1))
    good = [f"s3://{bucket}/good/{i}.jpg" for i in range(12)]
    for i, uri in enumerate(good):
        s3.put_object(Bucket=bucket, Key=uri.split("/", 3)[3], Body=jpeg_bytes(100 + i))
    images = upload_images(s3, bucket)
    broker = redis.Redis.from_url(redis_url)
    corpus = Corpus(Client(Settings(redis_url=redis_url, model=model)), model, bucket, good)

    corpus.sources({name: (f"s3://{bucket}/corpus/{name}", code)
                    for name, (_, code) in images.items()} | {
        "missing_key": (f"s3://{bucket}/corpus/no-such-key.jpg", ErrorCode.SOURCE_NOT_FOUND),
        "access_denied": (f"s3://{secret}/x.jpg", ErrorCode.ACCESS_DENIED),
        "bucket_not_allowed": (f"s3://{bucket}-other/x.jpg", ErrorCode.SOURCE_NOT_ALLOWED),
        "no_such_bucket": ("s3://no-such-bucket-dualstream/x.jpg", ErrorCode.SOURCE_NOT_FOUND),
        "local_file_outside_local_mode": ("file:///etc/passwd", ErrorCode.SOURCE_NOT_ALLOWED),
        "other_scheme": ("ftp://example.com/x.jpg", ErrorCode.SOURCE_NOT_ALLOWED),
    })
    corpus.invalid_jobs(invalid_jobs(model, good))
    corpus.invalid_messages(
        {"message_not_an_object": ["not", "an", "object"],
         "message_without_jobs": {"run_id": "r"}, "message_with_no_jobs": {"jobs": []}},
        {"body_not_json": b'{"jobs": [ {"task": ',
         "body_not_utf8": b'[[{"jobs": []}], {}, {}]\xff\xfe\xc3\x28'}, broker)
    # Valid jobs for a model this worker does not serve (a spec that parses or not): a result.
    corpus.valid({name: (Job(task=Task.TEXT_EMBEDDING, text="hello", model=other),
                         ErrorCode.WRONG_MODEL.value)
                  for name, other in {"other_model": "kakaobrain/align-base",
                                      "unparseable_model_spec": "no such model!"}.items()},
                 raw=True)
    # Valid edge cases: text longer than the model's context (truncated), 1,000 labels.
    corpus.valid({
        "text_over_model_context": (Job(task=Task.TEXT_EMBEDDING, text="word " * 3000,
                                        model=model), "done"),
        "1000_labels": (Job(task=Task.ZERO_SHOT, image=good[2], model=model,
                            zero_shot=ZeroShotOptions(labels=[f"label {i}" for i in range(1000)],
                                                      top_k=3)), "done"),
        "non_ascii_text": (Job(task=Task.TEXT_EMBEDDING, text="猫が好き 🐈 café", model=model),
                           "done")})
    assert len([c for c in corpus.cases if not c.name.startswith("batch-mate")]) >= 30

    proxy = FaultProxy(upstream=s3_endpoint).start()
    client, store = corpus.client, DeadLetterStore(broker, RedisKeys())
    by_id = [c for c in corpus.cases if c.job_id]
    by_message = [c for c in corpus.cases if c.message_id]
    with iam_enforced(s3_endpoint, secret) as credentials:
        worker = worker_launcher({
            "redis_url": redis_url, "s3_endpoint_url": proxy.url, "model": model,
            "output_uri": f"s3://{bucket}/embeddings", "health_dir": str(tmp_path / "h"),
            "allowed_buckets": [bucket, secret, "no-such-bucket-dualstream"],
            "max_image_bytes": MAX_IMAGE_BYTES}, extra_env=credentials)
        results = dict(zip([c.name for c in by_id],
                           client.wait([c.job_id for c in by_id if c.job_id], timeout=180),
                           strict=True))
        wait_for(lambda: {d.message_id for d in store.list()} >= {c.message_id
                                                                   for c in by_message},
                 60, "every invalid message's dead letter")
        assert worker.process.poll() is None, "the worker never crashed"
        assert client.result(client.embed_text("still alive", model=model),
                             timeout=60).status is Status.DONE
    proxy.stop()

    for case in by_id:
        check_result(case, results[case.name])
    letters = store.list()
    for case in by_message:
        check_dead_letter(case, [d for d in letters if d.message_id == case.message_id])
    relayed = proxy.relayed_bytes[f"/{bucket}/corpus/over_byte_limit"]
    assert relayed < OVERSIZED_BYTES // 2, "the byte limit is checked before the download"
    assert results["text_over_model_context"].text_truncated

    encoder = tiny_encoders["openclip"]
    for name in CONVERSIONS:
        data = images[name][0]
        reference = embed_images(encoder, [reference_rgb(data)])[0].numpy()
        stored = np.asarray(results[name].embedding, dtype=np.float32)
        assert float(stored @ reference) > 0.9999, name


def check_result(case: Case, result: JobResult) -> None:
    if case.expect == "done":
        assert result.status is Status.DONE, (case.name, result.error)
        return
    assert result.status is Status.FAILED, case.name
    assert result.error is not None and result.error.code == case.expect, (case.name,
                                                                           result.error)
    assert result.error.message, case.name


def check_dead_letter(case: Case, letters: list[DeadLetter]) -> None:
    assert len(letters) == 1, (case.name, letters)
    [letter] = letters
    assert letter.code == case.expect, (case.name, letter.code, letter.error)
    assert letter.error, case.name
    if case.name.startswith("body_"):
        assert letter.raw_body is not None and letter.payload is None


def test_a_worker_whose_model_does_not_load_stops_without_taking_messages(
        worker_launcher: Any, redis_url: str, tmp_path: Path) -> None:
    model = "no such model!"
    client = Client(Settings(redis_url=redis_url, model=model))
    job_id = client.embed_text("waiting for a worker that can serve it")
    worker = worker_launcher({"redis_url": redis_url, "model": model,
                              "output_uri": (tmp_path / "out").as_uri(),
                              "health_dir": str(tmp_path / "h")}, wait_ready=False)
    worker.process.wait(120)
    log = worker.output()
    assert "[unknown_model] cannot load model 'no such model!'" in log and "ready." not in log
    broker = redis.Redis.from_url(redis_url)
    assert broker.llen(queue_name(model)) + len(held_messages(broker)) == 1, "it waits"
    assert client.status(job_id) is Status.QUEUED
    assert DeadLetterStore(broker, RedisKeys()).list() == []
