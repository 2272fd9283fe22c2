"""The `dualstream` command: producer commands for every install, worker commands with the
`[worker]` extra. Without it, a worker command says so in one line and exits 1.

A user's mistake (a bad option, no model, Redis unreachable or refusing the password, no AWS
credentials) is one line on stderr, `Error: <what> (hint: <what to do>)`, and a non-zero exit
status: 2 for a usage error, 1 for anything else, 130 when interrupted. The traceback is shown
only with `dualstream --debug …` or `DUALSTREAM_DEBUG=1`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click
import redis
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from pydantic import ValidationError

from dualstream import __version__
from dualstream.serve import api
from producer.cli import COMMANDS as PRODUCER_COMMANDS
from producer.cli import UserError
from producer.event_cli import events
from producer.ops_cli import COMMANDS as OPS_COMMANDS
from schemas.errors import DualstreamError
from worker.cli import COMMANDS as WORKER_COMMANDS
from worker.extra import missing_worker_extra
from worker.tools_cli import COMMANDS as TOOL_COMMANDS

DEBUG_HINT = "run `dualstream --debug …` (or set DUALSTREAM_DEBUG=1) for the traceback"


@click.group()
@click.version_option(__version__, prog_name="dualstream")
@click.option("--debug", is_flag=True, envvar="DUALSTREAM_DEBUG",
              help="show tracebacks (also DUALSTREAM_DEBUG=1)")
def cli(debug: bool) -> None:
    """dualstream: embeddings and zero-shot labels for images and texts, from a queue."""


for _command in [*PRODUCER_COMMANDS, api, *OPS_COMMANDS, events, *WORKER_COMMANDS, *TOOL_COMMANDS]:
    cli.add_command(_command)


def debugging(args: Sequence[str], env: dict[str, str] | os._Environ[str]) -> bool:
    """`--debug` before the command's name, or DUALSTREAM_DEBUG set to a true value."""
    if env.get("DUALSTREAM_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    for arg in args:
        if arg == "--debug":
            return True
        if not arg.startswith("-"):
            return False
    return False


def _validation(exc: ValidationError) -> tuple[str, str]:
    error = exc.errors()[0]
    error["msg"] = error["msg"].removeprefix("Value error, ")
    where = ".".join(str(part) for part in error["loc"])
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if exc.title == "Settings":
        name = f"DUALSTREAM_{where.split('.')[0].upper()}"
        return f"{name}: {error['msg']}{more}", f"fix or unset {name}"
    return (f"invalid {exc.title.lower()}{f' {where}' if where else ''}: {error['msg']}{more}",
            "see `dualstream <command> --help`")


# Services a command talks to: what their errors mean for the user, and what to do.
_SERVICES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str, str], ...] = (
    (redis.AuthenticationError, "Redis wants a password, or refused the one given",
     "put the password in DUALSTREAM_REDIS_URL: redis://:PASSWORD@host:port/db"),
    ((redis.ConnectionError, redis.TimeoutError), "cannot reach Redis",
     "is redis-server running there? set DUALSTREAM_REDIS_URL (default "
     "redis://127.0.0.1:6379/0)"),
    (NoCredentialsError, "no AWS credentials",
     "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or run with a role"),
    (ClientError, "S3 refused",
     "check the bucket, the credentials' permissions and DUALSTREAM_S3_ENDPOINT_URL"),
    (BotoCoreError, "S3", "check DUALSTREAM_S3_ENDPOINT_URL and the network"),
)


def describe(exc: BaseException) -> tuple[str, str | None, int]:
    """(the one line, a hint, the exit status) for an error a user can act on."""
    if isinstance(exc, UserError):
        return exc.message, exc.hint, exc.exit_code
    if isinstance(exc, click.UsageError):
        command = exc.ctx.command_path if exc.ctx else "dualstream"
        return exc.format_message(), f"see `{command} --help`", exc.exit_code
    if isinstance(exc, click.ClickException):
        return exc.format_message(), None, exc.exit_code
    if isinstance(exc, (click.Abort, KeyboardInterrupt)):
        return "interrupted", None, 130
    if isinstance(exc, ValidationError):
        message, hint = _validation(exc)
        return message, hint, 2
    for kinds, what, hint in _SERVICES:
        if isinstance(exc, kinds):
            return f"{what}: {exc}", hint, 1
    if isinstance(exc, (DualstreamError, OSError)):
        return str(exc), None, 1
    return f"unexpected {type(exc).__name__}: {exc}", DEBUG_HINT, 1


def main(args: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    try:
        # Not standalone: errors come here, to be told in one line. `--help`, `--version`
        # and `ctx.exit` come back as an exit status.
        status = cli.main(argv, prog_name="dualstream", standalone_mode=False)
    except ModuleNotFoundError as exc:
        reason = missing_worker_extra(exc)
        if reason is None:
            _fail(exc, argv)
        sys.exit(reason)  # the reason on stderr, exit status 1
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001  # every error: one line
        _fail(exc, argv)
    sys.exit(status if isinstance(status, int) else 0)


def _fail(exc: BaseException, argv: list[str]) -> None:
    if debugging(argv, os.environ):
        raise exc
    message, hint, status = describe(exc)
    line = f"Error: {message}" + (f" (hint: {hint})" if hint else "")
    click.echo(" ".join(line.split()), err=True)  # one line, whatever the message held
    sys.exit(status)


if __name__ == "__main__":
    main()
