"""The worker's Prometheus metrics, and the HTTP endpoint that serves them with the probes.

Label sets are bounded: outcomes and error codes are closed enums, stages are four names; the
model a worker serves is one label of `dualstream_worker_info` (one worker, one model), so
dashboards join on it rather than every series carrying it.

One small HTTP server per worker process (`metrics_port`; 0 turns it off) answers
`/metrics`, and `/livez` and `/readyz` from the health monitor's last check: probes cost a
dictionary lookup, not a Python process start as `dualstream health` does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import REGISTRY, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from control.queue_load import QueueLoad
from schemas.results import Timings

log = logging.getLogger(__name__)

WORKER_INFO = Gauge("dualstream_worker_info", "The model and queue this worker serves (1).",
                    ["model", "queue", "device", "dtype"])
JOBS = Counter("dualstream_jobs_total",
               "Jobs this worker settled, by outcome (done, failed, already_done, retried) "
               "and error code ('' when done).", ["outcome", "code"])
BATCH_ITEMS = Histogram("dualstream_batch_items", "Items per model forward pass.",
                        ["modality"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
STAGE_SECONDS = Histogram(
    "dualstream_stage_seconds", "Seconds a done job spent in each stage (forward and write are "
    "its batch's).", ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
MODEL_LOAD_SECONDS = Gauge("dualstream_model_load_seconds", "Seconds the model took to load.")


def observe_done(timings: Timings) -> None:
    JOBS.labels("done", "").inc()
    for stage, ms in (("fetch", timings.fetch_ms), ("decode", timings.decode_ms),
                      ("forward", timings.encode_ms), ("write", timings.write_ms)):
        STAGE_SECONDS.labels(stage).observe(ms / 1000)


def observe(outcome: str, code: str = "") -> None:
    JOBS.labels(outcome, code).inc()


class QueueCollector(Collector):
    """The queue's jobs, queued and held, read from Redis when Prometheus scrapes."""

    def __init__(self, load: Callable[[], QueueLoad]) -> None:
        self._load = load

    def collect(self) -> Iterator[Metric]:
        try:
            load = self._load()
        except Exception as exc:  # noqa: BLE001 - Redis away: the scrape still answers
            log.warning("queue load unavailable: %s", exc)
            return
        jobs = GaugeMetricFamily("dualstream_queue_jobs",
                                 "Jobs in this worker's queue: queued, or held by workers.",
                                 labels=["queue", "state"])
        jobs.add_metric([load.queue, "queued"], load.queued_jobs)
        jobs.add_metric([load.queue, "held"], load.held_jobs)
        messages = GaugeMetricFamily("dualstream_queue_messages",
                                     "Messages in this worker's queue: queued, or held.",
                                     labels=["queue", "state"])
        messages.add_metric([load.queue, "queued"], load.queued_messages)
        messages.add_metric([load.queue, "held"], load.held_messages)
        consumers = GaugeMetricFamily("dualstream_queue_live_consumers",
                                      "Consumers of the queue whose heartbeat is current.",
                                      labels=["queue"])
        consumers.add_metric([load.queue], load.live_consumers)
        yield jobs
        yield messages
        yield consumers


class DeviceMemoryCollector(Collector):
    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("dualstream_device_memory_bytes",
                                   "Accelerator memory held by the model process (CUDA only).",
                                   labels=["kind"])
        for kind, value in self._read().items():
            family.add_metric([kind], value)
        yield family


_registered: set[str] = set()


def register_once(collector: Collector) -> None:
    """Collectors are per process: a second runtime in one process (tests) reuses the first."""
    name = type(collector).__name__
    if name not in _registered:
        REGISTRY.register(collector)
        _registered.add(name)


class _Endpoint(BaseHTTPRequestHandler):
    probes: Callable[[], tuple[bool, bool]]

    def do_GET(self) -> None:
        if self.path == "/metrics":
            self._answer(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif self.path in ("/livez", "/readyz"):
            live, ready = type(self).probes()
            ok = live if self.path == "/livez" else ready
            self._answer(200 if ok else 503, b"ok\n" if ok else b"not ok\n", "text/plain")
        else:
            self._answer(404, b"not found\n", "text/plain")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # a scrape every few seconds is not news


class MetricsServer:
    """`/metrics`, `/livez`, `/readyz` on `host:port`, on a daemon thread."""

    def __init__(self, host: str, port: int, probes: Callable[[], tuple[bool, bool]]) -> None:
        handler = type("Endpoint", (_Endpoint,), {"probes": staticmethod(probes)})
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ds-metrics",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
