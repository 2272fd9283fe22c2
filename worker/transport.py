"""Kombu's Redis transport, failing like a lost connection once its connection is closed.

After a broker outage, Celery closes the old connection while tasks still run; their acks (and
kombu's restore of held messages on close) then reach a channel whose connection is gone, and
kombu 5.7 raises AttributeError there, which Celery treats as unrecoverable: the worker exits.
A ConnectionError instead is logged and skipped; the message stays in Redis's unacked hash and
comes back through the visibility-timeout sweep.
"""

from __future__ import annotations

from typing import Any

import redis
from kombu.transport import redis as kombu_redis


class _BrokerChannel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.ConnectionError("this broker channel's connection was closed")
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
        return params


class BrokerTransport(kombu_redis.Transport):
    """Kombu's Redis transport with `_BrokerChannel`."""

    Channel = _BrokerChannel
