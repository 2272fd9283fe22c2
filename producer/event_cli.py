"""`dualstream events sqs|webhook`: turn upload events into jobs."""

from __future__ import annotations

import click

from control.deadletters import DeadLetterStore
from producer.cli import _client, _zero_shot, with_zero_shot
from producer.event_sources import EventSubmitter, poll_sqs, webhook_server
from producer.events import EventJobTemplate
from schemas.keys import RedisKeys


def _submitter(model: str | None, labels: str | None, templates: str, top_k: int,
               threshold: float | None, multi_label: bool) -> EventSubmitter:
    client = _client(model)
    template = EventJobTemplate(model=client._model(model),
                                zero_shot=_zero_shot(labels, templates, top_k, threshold,
                                                     multi_label))
    store = DeadLetterStore(client.redis, RedisKeys(client.settings.key_prefix))
    return EventSubmitter(client, template, store)


@click.group()
def events() -> None:
    """Consume S3/MinIO upload events and enqueue a job per new image."""


@events.command("sqs")
@click.argument("queue_url")
@click.option("--model", default=None)
@with_zero_shot
def sqs_command(queue_url: str, model: str | None, labels: str | None, templates: str,
                top_k: int, threshold: float | None, multi_label: bool) -> None:
    """Long-poll an SQS queue fed by S3 notifications, SNS or EventBridge."""
    import boto3

    submitter = _submitter(model, labels, templates, top_k, threshold, multi_label)
    settings = submitter.client.settings
    sqs = boto3.client("sqs", endpoint_url=settings.s3_endpoint_url,
                       region_name=settings.s3_region)
    poll_sqs(sqs, queue_url, submitter)


@events.command("webhook")
@click.option("--port", default=8080, show_default=True)
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--token", envvar="DUALSTREAM_WEBHOOK_TOKEN", default=None,
              help="bearer token MinIO must send (its auth_token)")
@click.option("--model", default=None)
@with_zero_shot
def webhook_command(port: int, host: str, token: str | None, model: str | None,
                    labels: str | None, templates: str, top_k: int, threshold: float | None,
                    multi_label: bool) -> None:
    """Serve a webhook for MinIO's notify_webhook target."""
    submitter = _submitter(model, labels, templates, top_k, threshold, multi_label)
    server = webhook_server(port, submitter, token=token, host=host)
    click.echo(f"listening on {host}:{server.server_address[1]}")
    server.serve_forever()
