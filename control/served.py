"""Which models are served: each worker announces its model, queue, version and host in Redis
every few seconds, with a TTL, so producers and the API can tell a model no worker serves (its
jobs would wait forever) and list what is served (`dualstream models`, `GET /v1/models`)."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import cast

import redis

from schemas.keys import RedisKeys

log = logging.getLogger(__name__)

ANNOUNCE_EVERY_S = 10.0
# A model is served while an announcement lives: three missed rounds and it is gone.
ANNOUNCEMENT_TTL_S = 30


@dataclass(frozen=True)
class ServedModel:
    model: str  # the spec the worker was started with
    queue: str
    version: str  # dualstream's version on that worker
    worker: str  # host-pid
    announced_at: float


class ModelRegistry:
    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self._redis = client
        self._keys = keys

    def announce(self, served: ServedModel) -> None:
        self._redis.set(self._keys.served(served.queue, served.worker),
                        json.dumps(asdict(served)), ex=ANNOUNCEMENT_TTL_S)

    def withdraw(self, served: ServedModel) -> None:
        self._redis.delete(self._keys.served(served.queue, served.worker))

    def served(self) -> list[ServedModel]:
        """Every live announcement, by queue then worker."""
        keys = sorted(self._redis.scan_iter(match=self._keys.served("*", "*"), count=1000))
        if not keys:
            return []
        found: list[ServedModel] = []
        for raw in cast(list[bytes | None], self._redis.mget(keys)):
            if raw is not None:
                try:
                    found.append(ServedModel(**json.loads(raw)))
                except (ValueError, TypeError):
                    log.warning("ignoring an unreadable model announcement: %r", raw[:200])
        return found

    def queues(self) -> dict[str, list[ServedModel]]:
        by_queue: dict[str, list[ServedModel]] = {}
        for served in self.served():
            by_queue.setdefault(served.queue, []).append(served)
        return by_queue


class Announcer:
    """A worker's thread that keeps its announcement alive, and withdraws it on stop."""

    def __init__(self, registry: ModelRegistry, served: ServedModel,
                 interval_s: float = ANNOUNCE_EVERY_S) -> None:
        self._registry = registry
        self._served = served
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ds-announce", daemon=True)

    def start(self) -> Announcer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:
            self._registry.withdraw(self._served)
        except Exception:  # Redis away: the announcement expires by itself
            log.warning("could not withdraw the model announcement", exc_info=True)

    def _run(self) -> None:
        while True:
            try:
                self._registry.announce(
                    ServedModel(**{**asdict(self._served), "announced_at": time.time()}))
            except Exception as exc:  # noqa: BLE001 - retried next round
                log.warning("announcing the model failed: %s", exc)
            if self._stop.wait(self._interval_s):
                return
