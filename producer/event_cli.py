"""`dualstream events sqs|webhook|minio-redis`: turn upload events into jobs."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import click
from pydantic import SecretStr

from control.connections import redis_client
from control.deadletters import DeadLetterStore
from producer.cli import _client, _zero_shot, with_zero_shot
from producer.event_sources import EventSubmitter
from producer.events import EventJobTemplate
from producer.metrics import serve as serve_metrics
from producer.sns_confirm import SubscriptionConfirmer


def _submitter(model: str | None, labels: str | None, templates: str, top_k: int,
               threshold: float | None, multi_label: bool) -> EventSubmitter:
    client = _client(model, check=False)  # a consumer waits out a Redis that is down
    template = EventJobTemplate(model=client._model(model),
                                zero_shot=_zero_shot(labels, templates, top_k, threshold,
                                                     multi_label))
    store = DeadLetterStore.for_settings(client.redis, client.settings)
    serve_metrics(client.settings.metrics_port, client.settings.metrics_host)
    confirmer = SubscriptionConfirmer(extra_hosts=tuple(client.settings.sns_confirm_hosts))
    return EventSubmitter(client, template, store, confirmer)


def _stop_on_sigterm() -> threading.Event:
    """SIGTERM finishes the delivery at hand, then stops."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


@click.group()
def events() -> None:
    """Consume S3/MinIO upload events and enqueue a job per new image."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


@events.command("sqs")
@click.argument("queue_url")
@click.option("--endpoint-url", default=None, help="an SQS endpoint other than AWS's")
@click.option("--wait-s", default=20, show_default=True, help="long-poll wait per receive")
@click.option("--model", default=None)
@with_zero_shot
def sqs_command(queue_url: str, endpoint_url: str | None, wait_s: int, model: str | None,
                **zero_shot: Any) -> None:
    """Long-poll an SQS queue fed by S3 notifications, SNS or EventBridge."""
    import boto3

    from producer.sqs_events import poll_sqs

    submitter = _submitter(model, **zero_shot)
    sqs = boto3.client("sqs", endpoint_url=endpoint_url,
                       region_name=submitter.client.settings.s3_region)
    stats = poll_sqs(sqs, queue_url, submitter, stop=_stop_on_sigterm(), wait_s=wait_s)
    click.echo(f"stopped: {stats.as_dict()}")


@events.command("webhook")
@click.option("--port", default=8080, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="the address to bind (0.0.0.0: every interface)")
@click.option("--token", default=None,
              help="the token requests must carry (default: DUALSTREAM_WEBHOOK_TOKEN)")
@click.option("--model", default=None)
@with_zero_shot
def webhook_command(port: int, host: str, token: str | None, model: str | None,
                    **zero_shot: Any) -> None:
    """Serve a webhook for MinIO's notify_webhook target (or an SNS HTTP subscription)."""
    from producer.webhook import webhook_server

    submitter = _submitter(model, **zero_shot)
    settings = submitter.client.settings
    secret = settings.webhook_token.get_secret_value() if settings.webhook_token else None
    try:
        server = webhook_server(port, submitter, token=token or secret, host=host,
                                require_token=settings.webhook_require_token)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"listening on {host}:{server.server_address[1]}")
    stop = _stop_on_sigterm()

    def shut_down_on_stop() -> None:
        stop.wait()
        server.shutdown()

    threading.Thread(target=shut_down_on_stop, daemon=True).start()
    server.serve_forever()


@events.command("minio-redis")
@click.argument("key")
@click.option("--redis-url", default=None,
              help="the Redis MinIO's target writes to (default: DUALSTREAM_REDIS_URL)")
@click.option("--consumer", default="default", show_default=True,
              help="names this consumer's processing list; one consumer per name")
@click.option("--model", default=None)
@with_zero_shot
def minio_redis_command(key: str, redis_url: str | None, consumer: str, model: str | None,
                        **zero_shot: Any) -> None:
    """Consume MinIO's Redis target (format=access) list KEY."""
    from producer.minio_redis import MinioRedisConsumer

    submitter = _submitter(model, **zero_shot)
    settings = submitter.client.settings
    if redis_url:
        settings = settings.model_copy(update={"redis_url": SecretStr(redis_url)})
    consumer_loop = MinioRedisConsumer(redis_client(settings), key, submitter, consumer)
    click.echo(f"consuming {key} as {consumer}")
    stats = consumer_loop.run(_stop_on_sigterm())
    click.echo(f"stopped: {stats.as_dict()}")
