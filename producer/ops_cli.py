"""Operator commands: `models` (what workers serve), `queue-load` (the work a model's queue
holds, for scaling) and `restore` (put back what dead workers held, from outside any worker). No
torch is imported here. `dualstream api` is in dualstream/serve.py, which composes the API with
search."""

from __future__ import annotations

import json
import signal
import threading
from types import FrameType

import click

from control.broker import heartbeat_timing
from control.connections import redis_client
from control.inflight import InflightLedger
from control.queue_load import queue_load
from control.served import ModelRegistry
from schemas.keys import RedisKeys, queue_name
from schemas.settings import Settings


@click.command("queue-load")
@click.option("--model", default=None, help="model spec (default: DUALSTREAM_MODEL)")
def queue_load_command(model: str | None) -> None:
    """Print, as JSON, the jobs a model's queue holds: queued, held by workers (dead ones
    included until restored), and the live consumers."""
    settings = Settings()
    spec = model or settings.model
    if not spec:
        raise click.UsageError("no model: pass --model or set DUALSTREAM_MODEL")
    _, ttl = heartbeat_timing(settings)
    load = queue_load(redis_client(settings), RedisKeys(settings.key_prefix), queue_name(spec),
                      heartbeat_ttl_s=ttl)
    click.echo(json.dumps(load.as_json()))


@click.command()
@click.option("--once", is_flag=True, help="sweep once and exit (for a CronJob)")
def restore(once: bool) -> None:
    """Put the messages of workers that stopped beating back on their queues, every heartbeat
    interval until SIGTERM: with no worker running (scaled to zero), nothing else would."""
    settings = Settings()
    interval, ttl = heartbeat_timing(settings)
    ledger = InflightLedger(redis_client(settings), RedisKeys(settings.key_prefix),
                            heartbeat_ttl_s=ttl)
    if once:
        click.echo(f"restored {ledger.sweep()} messages")
        return
    stop = threading.Event()

    def stopping(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGINT, stopping)
    click.echo(f"restoring every {interval:.1f} s (a worker is dead after {ttl:.0f} s silent)")
    while not stop.wait(interval):
        try:
            moved = ledger.sweep()
        except Exception as exc:  # noqa: BLE001 - Redis away: try again next round
            click.echo(f"sweep failed, retrying: {type(exc).__name__}: {exc}", err=True)
            continue
        if moved:
            click.echo(f"restored {moved} messages", err=True)


@click.command()
def models() -> None:
    """List the models workers serve now: model, queue, workers, versions."""
    settings = Settings()
    served = ModelRegistry(redis_client(settings), RedisKeys(settings.key_prefix)).queues()
    if not served:
        click.echo("no worker has announced a model in the last minute")
    for queue, group in sorted(served.items()):
        click.echo(json.dumps({"model": group[0].model, "queue": queue,
                               "workers": sorted(s.worker for s in group),
                               "versions": sorted({s.version for s in group})}))


COMMANDS = [models, queue_load_command, restore]
