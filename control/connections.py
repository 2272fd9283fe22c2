"""Clients for the services dualstream talks to, built from the settings object.

Both clients retry transient faults themselves with jittered exponential backoff: redis-py's
`Retry` and botocore's adaptive retry mode are well-kept implementations of exactly that.

`rediss://` URLs always verify the server's certificate and host name, against
`redis_tls_ca_file` when it is set (a private CA) or the system's CAs otherwise; a client
certificate is sent when `redis_tls_cert_file` and `redis_tls_key_file` are set. The same
options reach Celery's broker connection through `broker_ssl_options`.

`sentinel://[:password@]host:port[/db]` URLs, several joined by `;` (one per sentinel, as kombu
takes them), name Redis Sentinels: clients ask them for the primary of
`redis_sentinel_master` and follow it when a replica is promoted. The password is the
primary's; the sentinels themselves are reached without one.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
import redis
from botocore.config import Config as BotoConfig
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from schemas.settings import Settings

REDIS_RETRIES = 6
S3_MAX_ATTEMPTS = 8


def broker_ssl_options(settings: Settings) -> dict[str, Any] | None:
    """TLS options for a `rediss://` URL, in the form both redis-py and kombu take."""
    if not settings.redis_dsn.startswith("rediss://"):
        return None
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.redis_tls_ca_file:
        options["ssl_ca_certs"] = settings.redis_tls_ca_file
    if settings.redis_tls_cert_file:
        options["ssl_certfile"] = settings.redis_tls_cert_file
    if settings.redis_tls_key_file:
        options["ssl_keyfile"] = settings.redis_tls_key_file
    return options


def is_sentinel(url: str) -> bool:
    return url.startswith("sentinel://")


def sentinel_addresses(url: str) -> tuple[list[tuple[str, int]], str | None, int]:
    """(the sentinels' host and port, the primary's password, the database) of a URL."""
    parts = [urlsplit(part) for part in url.split(";") if part]
    first = parts[0]
    db = int(first.path.lstrip("/") or 0)
    password = unquote(first.password) if first.password else None
    return [(part.hostname or "localhost", part.port or 26379) for part in parts], password, db


class PrimaryFollowingConnection(SentinelManagedConnection):
    """A connection that asks the sentinels for the primary on every connect, retries included.

    redis-py (8.1) reconnects a dropped connection inside `send_packed_command` to the address
    it had, and retries that address alone: a pipeline in flight when the primary died kept
    retrying the dead one until its retries ran out (about 80 s for a producer, past its
    minute of riding out a failover), however soon a replica was promoted."""

    def _connect(self) -> Any:
        if self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super()._connect()


def redis_client(settings: Settings, *, retries: int = REDIS_RETRIES,
                 timeout_s: float = 30) -> redis.Redis:
    """A client that retries dropped connections and timeouts `retries` times, with jitter."""
    options: dict[str, Any] = {
        "socket_connect_timeout": min(5, timeout_s),
        "socket_timeout": timeout_s,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), retries),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
        **(broker_ssl_options(settings) or {}),
    }
    if is_sentinel(settings.redis_dsn):
        sentinels, password, db = sentinel_addresses(settings.redis_dsn)
        sentinel = Sentinel(sentinels, socket_timeout=min(5, timeout_s))
        client: redis.Redis = sentinel.master_for(
            settings.redis_sentinel_master, password=password, db=db,
            connection_class=PrimaryFollowingConnection, **options)
        return client
    return redis.Redis.from_url(settings.redis_dsn, decode_responses=False,
                                health_check_interval=15, **options)


def s3_client(settings: Settings) -> Any:
    config = BotoConfig(
        retries={"mode": "adaptive", "max_attempts": S3_MAX_ATTEMPTS},
        max_pool_connections=max(10, settings.fetch_threads * 2),
        connect_timeout=5,
        read_timeout=30,
    )
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        config=config,
    )
