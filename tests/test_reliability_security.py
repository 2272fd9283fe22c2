"""Security: Redis AUTH and TLS (certificates made by the test, a client certificate required),
secrets kept out of logs, and pickled messages refused without being deserialised.

(Limits on sources, schemes and buckets are proven by tests/test_reliability_corpus.py.)
"""

from __future__ import annotations

import base64
import pickle
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis

from control.deadletters import DeadLetterStore
from producer.client import Client
from schemas.keys import RedisKeys, queue_name
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.faults import (
    OwnedRedis,
    TlsFiles,
    celery_message,
    launch_worker,
    make_tls_files,
    wait_for,
)
from tests.fixtures.services import REPO, WorkerProcess, worker_env
from tests.images import jpeg_bytes

pytestmark = pytest.mark.timeout(300)

PASSWORD = f"redis-pw-{uuid.uuid4().hex}"
AWS_SECRET = f"aws-secret-{uuid.uuid4().hex}"


@dataclass
class SecureSetup:
    server: OwnedRedis
    tls: TlsFiles
    worker: WorkerProcess
    settings: dict[str, object]
    bucket: str
    logs: Path

    def client(self) -> Client:
        return Client(Settings(**self.settings))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, tiny_model_dirs: dict[str, str],
           s3_endpoint: str) -> Iterator[SecureSetup]:
    root = tmp_path_factory.mktemp("secure")
    tls = make_tls_files(root / "tls")
    server = OwnedRedis(root / "redis", password=PASSWORD, tls=tls).start()
    bucket = f"secure-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="cat.jpg", Body=jpeg_bytes(5))
    settings: dict[str, object] = {
        "redis_url": server.url, "redis_tls_ca_file": str(tls.ca_cert),
        "redis_tls_cert_file": str(tls.client_cert), "redis_tls_key_file": str(tls.client_key),
        "model": tiny_model_dirs["openclip"], "s3_endpoint_url": s3_endpoint,
        "output_uri": f"s3://{bucket}/out", "health_dir": str(root / "health")}
    worker = launch_worker(root / "worker.log", settings, extra_env={
        "AWS_ACCESS_KEY_ID": "AKIDSECURETEST", "AWS_SECRET_ACCESS_KEY": AWS_SECRET})
    yield SecureSetup(server, tls, worker, settings, bucket, root)
    worker.stop()
    server.stop()


def test_jobs_run_over_redis_with_auth_and_tls(secure: SecureSetup) -> None:
    client = secure.client()
    image = client.embed_image(f"s3://{secure.bucket}/cat.jpg")
    text = client.embed_text("a cat on a mat")
    assert [r.status for r in client.wait([image, text], timeout=120)] == [Status.DONE] * 2
    listed = subprocess.run([sys.executable, "-m", "dualstream.cli", "dlq", "list"],
                            env=worker_env(**secure.settings), cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr

    tls = secure.tls
    plain = redis.Redis(port=secure.server.port, socket_connect_timeout=2, socket_timeout=2)
    with pytest.raises(redis.ConnectionError):
        plain.ping()  # the port speaks TLS only
    anonymous = redis.Redis(port=secure.server.port, ssl=True, ssl_ca_certs=str(tls.ca_cert),
                            ssl_certfile=str(tls.client_cert), ssl_keyfile=str(tls.client_key))
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    without_certificate = redis.Redis.from_url(secure.server.url, ssl_ca_certs=str(tls.ca_cert),
                                               socket_connect_timeout=2, socket_timeout=2)
    with pytest.raises(redis.ConnectionError):
        without_certificate.ping()  # the server requires a client certificate
    untrusted = Settings(**{**secure.settings, "redis_tls_ca_file": None})  # type: ignore[arg-type]
    with pytest.raises(redis.ConnectionError):
        Client(untrusted).redis.ping()  # the test CA is not among the system's


def test_a_pickled_message_is_refused_without_being_deserialised(secure: SecureSetup,
                                                                 tmp_path: Path) -> None:
    marker = tmp_path / "pickle-ran"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (open, (str(marker), "w"))

    body = pickle.dumps(Exploit())
    queue = queue_name(str(secure.settings["model"]))
    message_id = str(uuid.uuid4())
    broker = secure.server.client()
    broker.lpush(queue, celery_message([], queue=queue, body=body, message_id=message_id,
                                       content_type="application/x-python-serialize"))
    store = DeadLetterStore(broker, RedisKeys())
    letter = wait_for(lambda: next((d for d in store.list() if d.message_id == message_id),
                                   None), 60, "the refused message's dead letter")
    assert letter.content_type == "application/x-python-serialize" and letter.payload is None
    assert base64.b64decode(letter.raw_body or "") == body, "kept as bytes, never unpickled"
    assert "ContentDisallowed" in letter.error
    client = secure.client()
    assert client.result(client.embed_text("after the pickle"), timeout=60).status is Status.DONE
    assert not marker.exists(), "the pickle's payload never ran"
    assert broker.llen(queue) == 0


def test_secrets_never_appear_in_logs(secure: SecureSetup, tmp_path: Path) -> None:
    wrong = f"wrong-pw-{uuid.uuid4().hex}"
    settings = {**secure.settings, "redis_url": secure.server.url.replace(PASSWORD, wrong)}
    refused = launch_worker(tmp_path / "refused.log", settings, wait_ready=False)
    try:
        wait_for(lambda: "Cannot connect" in refused.output()
                 or "invalid username-password" in refused.output(), 60, "refusal logged")
        time.sleep(1)
        assert "ready." not in refused.output()
    finally:
        refused.process.kill()
        refused.process.wait()
    logs = {"worker": secure.worker.output(), "refused worker": refused.output()}
    logs |= {f"redis {p.name}": p.read_text(errors="replace")
             for p in (secure.logs / "redis").glob("*.log")}
    for name, text in logs.items():
        assert text, name
        for secret in (PASSWORD, wrong, AWS_SECRET):
            assert secret not in text, f"a secret appears in the {name} log"
    assert ":**@" in logs["worker"], "the broker URL is logged masked"
