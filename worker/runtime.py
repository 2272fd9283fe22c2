"""The composition root of one worker process: clients, the model, the pipeline, the message
policy and the health monitor, built once; and their deliberate shutdown order.

The process holds one `Runtime`, built before the consumer starts (`worker/tasks.py`), so a
forked child never inherits CUDA and a worker whose model does not load never takes a message.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from control.broker import heartbeat_timing
from control.connections import redis_client
from control.deadletters import DeadLetterStore
from control.objects import output_store
from control.queue_load import queue_load
from control.results import ResultStore
from control.served import Announcer, ModelRegistry, ServedModel
from dualstream import __version__
from schemas.keys import RedisKeys, queue_name
from schemas.settings import Settings
from worker import metrics
from worker.health import HealthMonitor
from worker.message_policy import MessagePolicy
from worker.metrics import MetricsServer
from worker.models.base import Encoder
from worker.models.loader import load_encoder
from worker.outputs import ShardWriter
from worker.pipeline import Pipeline
from worker.sources import SourceReader

log = logging.getLogger(__name__)

# Pipeline.close may overrun its timeout by up to a second per stage thread it joins.
PIPELINE_CLOSE_OVERRUN_S = 2.0


def worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class Runtime:
    settings: Settings
    encoder: Encoder
    results: ResultStore
    dead_letters: DeadLetterStore
    pipeline: Pipeline
    policy: MessagePolicy
    health: HealthMonitor
    metrics_server: MetricsServer | None = None
    announcer: Announcer | None = None

    def begin_drain(self) -> None:
        """SIGTERM: the policy stops starting messages; readiness goes."""
        self.policy.begin_drain(self.settings.drain_timeout_s)
        self.health.drain()

    def close(self) -> None:
        start = time.monotonic()
        if self.announcer is not None:
            self.announcer.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.health.stop()
        budget = min(self.policy.close_by - time.monotonic(), self.settings.drain_timeout_s)
        self.pipeline.close(max(0.5, budget - PIPELINE_CLOSE_OVERRUN_S))
        log.info("pipeline closed in %.1f s", time.monotonic() - start)


def build_runtime(settings: Settings, encoder: Encoder | None = None) -> Runtime:
    """Everything a worker process holds; `encoder` given by tests, loaded otherwise."""
    if encoder is None:
        started = time.monotonic()
        encoder = load_encoder(settings.model, device=settings.device, dtype=settings.dtype,
                               channels_last=settings.channels_last, compile=settings.compile)
        metrics.MODEL_LOAD_SECONDS.set(time.monotonic() - started)
    client = redis_client(settings)
    keys = RedisKeys(settings.key_prefix)
    results = ResultStore(client, keys, settings.result_ttl_s, settings.claim_lease_s)
    dead_letters = DeadLetterStore.for_settings(client, settings)
    writer = ShardWriter(output_store(settings), results, worker=worker_name(),
                         lease_s=settings.claim_lease_s)
    pipeline = Pipeline(settings, encoder, SourceReader(settings), writer, results)
    policy = MessagePolicy(settings, pipeline, results, dead_letters)
    health = HealthMonitor(
        Path(settings.health_dir), interval_s=settings.health_interval_s,
        stall_s=settings.stall_timeout_s, pipeline_ok=lambda: pipeline.healthy,
        last_progress=lambda: pipeline.last_progress,
        broker_ok=_answers(redis_client(settings, retries=0, timeout_s=2.0)))
    health.start()
    announcer = Announcer(ModelRegistry(client, keys), ServedModel(
        model=settings.model, queue=queue_name(settings.model), version=__version__,
        worker=worker_name(), announced_at=time.time())).start()
    return Runtime(settings, encoder, results, dead_letters, pipeline, policy, health,
                   _serve_metrics(settings, client, keys, health), announcer)


def _serve_metrics(settings: Settings, client: redis.Redis, keys: RedisKeys,
                   health: HealthMonitor) -> MetricsServer | None:
    if not settings.metrics_port:
        return None
    queue = queue_name(settings.model)
    metrics.WORKER_INFO.labels(settings.model, queue, settings.device, settings.dtype).set(1)
    _, ttl = heartbeat_timing(settings)
    metrics.register_once(metrics.QueueCollector(
        lambda: queue_load(client, keys, queue, heartbeat_ttl_s=ttl)))
    if settings.device != "cpu":
        metrics.register_once(metrics.DeviceMemoryCollector(_cuda_memory))
    return metrics.MetricsServer(settings.metrics_host, settings.metrics_port,
                                 health.last).start()


def _cuda_memory() -> dict[str, int]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"allocated": int(torch.cuda.memory_allocated()),
            "reserved": int(torch.cuda.memory_reserved())}


def _answers(probe: redis.Redis) -> Callable[[], bool]:
    """Readiness probes get a client that answers at once rather than after the retries."""

    def ping() -> bool:
        try:
            return bool(probe.ping())
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False

    return ping


_runtimes: dict[int, Runtime] = {}
_runtime_lock = threading.Lock()


def get_runtime(settings: Settings) -> Runtime:
    """The process's runtime, built on first use."""
    with _runtime_lock:
        key = os.getpid()
        if key not in _runtimes:
            _runtimes[key] = build_runtime(settings)
        return _runtimes[key]


def existing_runtime() -> Runtime | None:
    """The process's runtime if it was built; never builds one (safe in a signal handler)."""
    return _runtimes.get(os.getpid())


def close_runtime() -> None:
    with _runtime_lock:
        runtime = _runtimes.pop(os.getpid(), None)
    if runtime is not None:
        runtime.close()
