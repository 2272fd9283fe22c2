"""The `dualstream` command: producer commands for every install, worker commands with the
`[worker]` extra. Without it, a worker command says so in one line and exits 1."""

from __future__ import annotations

import sys

import click

from dualstream import __version__
from producer.cli import COMMANDS as PRODUCER_COMMANDS
from producer.event_cli import events
from producer.ops_cli import COMMANDS as OPS_COMMANDS
from worker.cli import COMMANDS as WORKER_COMMANDS
from worker.extra import missing_worker_extra
from worker.tools_cli import COMMANDS as TOOL_COMMANDS


@click.group()
@click.version_option(__version__, prog_name="dualstream")
def cli() -> None:
    """dualstream: embeddings and zero-shot labels for images and texts, from a queue."""


for _command in [*PRODUCER_COMMANDS, *OPS_COMMANDS, events, *WORKER_COMMANDS, *TOOL_COMMANDS]:
    cli.add_command(_command)


def main() -> None:
    try:
        cli()
    except ModuleNotFoundError as exc:
        reason = missing_worker_extra(exc)
        if reason is None:
            raise
        sys.exit(reason)  # the reason on stderr, exit status 1


if __name__ == "__main__":
    main()
