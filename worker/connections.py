"""Clients for the services dualstream talks to, built from the settings object.

Both clients retry transient faults themselves with jittered exponential backoff: redis-py's
`Retry` and botocore's adaptive retry mode are well-kept implementations of exactly that.
"""

from __future__ import annotations

from typing import Any

import boto3
import redis
from botocore.config import Config as BotoConfig
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from schemas.settings import Settings

REDIS_RETRIES = 6
S3_MAX_ATTEMPTS = 8


def redis_client(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_dsn,
        decode_responses=False,
        health_check_interval=15,
        socket_connect_timeout=5,
        socket_timeout=30,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=2.0), REDIS_RETRIES),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


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
