"""Monitoring as shipped: a real Prometheus (Debian's package) scrapes a real worker and a real
event consumer; the counters and histograms read back through its HTTP API; every dashboard
query and alert rule evaluates there and names only metrics that exist; `promtool` accepts the
rules, and the PrometheusRule carries the same groups."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from producer.client import Client
from schemas.jobs import Job, Task
from schemas.results import Status
from schemas.settings import Settings
from tests.fixtures.event_bodies import minio_webhook
from tests.fixtures.services import REPO, free_port, worker_env
from tests.test_api import serve
from tests.test_worker_e2e import upload_images
from worker.metrics import DeviceMemoryCollector

pytestmark = pytest.mark.timeout(400)
MONITORING = REPO / "k8s" / "monitoring"
# Series Prometheus itself or every client library makes, which a query may name too.
BUILT_IN = {"up", "process_resident_memory_bytes"}
# A worker has them only on a CUDA device: checked against the collector that makes them.
GPU_ONLY = {family.name for family in DeviceMemoryCollector(lambda: {"allocated": 1}).collect()}


def _needs(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is missing: scripts/setup.sh installs Debian's prometheus")
        pytest.skip(f"{tool} is not installed (scripts/setup.sh installs it)")
    return path


def _rule_groups() -> list[dict[str, Any]]:
    return list(yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"])


def _expressions() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return queries + [rule["expr"] for group in _rule_groups() for rule in group["rules"]]


def _api(port: int, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}{query}",
                                timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]


def _value(port: int, expr: str) -> float:
    result = _api(port, "query", query=expr)["result"]
    return sum(float(series["value"][1]) for series in result)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[int, list[int]]]:
    """A Prometheus scraping three ports every half second: a worker's, an event consumer's and
    the API's."""
    binary = _needs("prometheus")
    port, targets = free_port(), [free_port(), free_port(), free_port()]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
        "rule_files": [str(MONITORING / "alerts.yml")],
        "scrape_configs": [
            {"job_name": "dualstream-worker",
             "static_configs": [{"targets": [f"127.0.0.1:{targets[0]}"]}]},
            {"job_name": "dualstream-events",
             "static_configs": [{"targets": [f"127.0.0.1:{targets[1]}"]}]},
            {"job_name": "dualstream-api",
             "static_configs": [{"targets": [f"127.0.0.1:{targets[2]}"]}]}]}))
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise AssertionError((tmp_path / "prometheus.log").read_text()) from None
                time.sleep(0.2)
        yield port, targets
    finally:
        process.terminate()
        process.wait(30)


def test_promtool_accepts_the_rules_and_the_prometheus_rule_matches_them() -> None:
    promtool = _needs("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(MONITORING / "alerts.yml")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rule = yaml.safe_load((MONITORING / "prometheus-rule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule" and rule["spec"]["groups"] == _rule_groups()


def test_prometheus_reads_a_worker_and_an_event_consumer_and_every_query_evaluates(
        prometheus: tuple[int, list[int]], start_worker: Any, redis_url: str,
        s3_endpoint: str, s3: Any, bucket: str, tiny_model_dirs: dict[str, str]) -> None:
    port, (worker_port, events_port, api_port) = prometheus
    model = tiny_model_dirs["openclip"]
    upload_images(s3, bucket, 2)
    start_worker(redis_url=redis_url, s3_endpoint_url=s3_endpoint, model=model,
                 output_uri=f"s3://{bucket}/embeddings", metrics_port=worker_port)
    consumer_port = free_port()
    consumer = subprocess.Popen(
        [sys.executable, "-m", "dualstream.cli", "events", "webhook", "--port",
         str(consumer_port), "--token", "t0ken", "--model", model],
        env={**worker_env(redis_url=redis_url, metrics_port=events_port)}, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = serve(Settings(redis_url=redis_url, api_token="t0ken"), api_port)
    base = next(api)
    try:
        assert _get(base, "/v1/models", "t0ken") == 200 and _get(base, "/v1/models", None) == 401
        client = Client(Settings(redis_url=redis_url, model=model))
        jobs = [Job(task=Task.IMAGE_EMBEDDING, image=f"s3://{bucket}/photos/{name}", model=model)
                for name in ("img000.jpg", "img001.jpg", "missing.jpg")]
        results = client.wait(client.submit_many(jobs), timeout=120)
        assert [r.status for r in results] == [Status.DONE, Status.DONE, Status.FAILED]
        _post_event(consumer_port, minio_webhook("photos/img000.jpg", bucket=bucket, version=None))

        deadline = time.monotonic() + 60
        while (_value(port, 'dualstream_jobs_total{job="dualstream-worker",outcome="done"}') < 2
               or _value(port, 'dualstream_events_total{outcome="enqueued"}') < 1
               or _value(port, 'dualstream_api_requests_total{status="401"}') < 1):
            assert time.monotonic() < deadline, "Prometheus never scraped the counts"
            time.sleep(0.5)
        # Each series of the worker's own (the API's /metrics is this test process's registry,
        # which other tests' in-process pipelines have counted in).
        worker = 'job="dualstream-worker"'
        assert _value(port, f'dualstream_jobs_total{{{worker},outcome="failed",'
                            'code="source_not_found"}') == 1
        assert _value(port, f'dualstream_stage_seconds_count{{{worker},stage="forward"}}') == 2
        assert _value(port, f"dualstream_batch_items_count{{{worker}}}") >= 1

        names = set(_api(port, "label/__name__/values"))
        for expr in _expressions():
            _api(port, "query", query=expr)  # evaluates without error
            for name in re.findall(r"\b(dualstream_[a-z_]+|process_[a-z_]+|up)\b", expr):
                assert name in names | BUILT_IN | GPU_ONLY, f"{name} in {expr!r} does not exist"
    finally:
        consumer.terminate()
        consumer.wait(30)
        next(api, None)


def _get(base: str, path: str, token: str | None) -> int:
    request = urllib.request.Request(f"{base}{path}",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def _post_event(port: int, event: dict[str, Any]) -> None:
    deadline = time.monotonic() + 60
    while True:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/",
                                         data=json.dumps(event).encode(), method="POST",
                                         headers={"Authorization": "Bearer t0ken"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
