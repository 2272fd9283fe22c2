"""Producer commands: submit, bulk, status, results, dlq, schema. No torch is imported here."""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import click
from pydantic import BaseModel, ValidationError
from tqdm import tqdm

from control.objects import local_path
from producer.bulk import IMAGE_SUFFIXES, BulkRequest, jobs_for, list_sources, source_etag
from producer.client import Client, ResultTimeout
from schemas.jobs import Job, JobMessage, Task, ZeroShotOptions
from schemas.records import embedding_b64
from schemas.results import JobResult, RunProgress
from schemas.settings import Settings


class UserError(click.ClickException):
    """A mistake the user can fix: told in one line, with what to do about it
    (dualstream/cli.py prints it), and a non-zero exit status."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1) -> None:
        super().__init__(message)
        self.hint = hint
        self.exit_code = exit_code  # type: ignore[misc]  # Click's is a class default


USAGE = 2  # the exit status of a usage error, as Click's own
INTERRUPTED = 130


def _client(model: str | None = None, *, needs_model: bool = False,
            check: bool = True) -> Client:
    """The producer client; with `check`, Redis is asked once now, so a wrong address or
    password is one line at once, not a minute of retries (long-running consumers pass
    check=False: they ride out a Redis that is down when they start)."""
    settings = Settings()
    if model:
        settings = settings.model_copy(update={"model": model})
    if needs_model and not settings.model:
        raise UserError("no model given", "pass --model or set DUALSTREAM_MODEL", USAGE)
    client = Client(settings)
    if check:
        client.check_connection()
    return client


# What each zero-shot field is called on the command line, and what it takes.
_OPTION_HINTS = {
    "labels": ("--labels", "comma-separated names, none blank, e.g. --labels 'cat,dog'"),
    "templates": ("--templates", "each template holds one {} where the label goes, e.g. "
                  "--templates 'a photo of {}.|a drawing of {}.'"),
    "top_k": ("--top-k", "1 or more"),
    "threshold": ("--threshold", "a score between 0 and 1"),
}


def _zero_shot(labels: str | None, templates: str, top_k: int,
               threshold: float | None, multi_label: bool) -> ZeroShotOptions | None:
    if labels is None:
        if templates != "default" or threshold is not None or multi_label:
            raise UserError("--templates, --threshold and --multi-label need --labels",
                            "add --labels 'cat,dog'", USAGE)
        return None
    names = ("default", "openai_imagenet", "simple_imagenet")
    chosen = templates if templates in names else templates.split("|")
    try:
        return ZeroShotOptions.model_validate({
            "labels": [x.strip() for x in labels.split(",")], "templates": chosen,
            "top_k": top_k, "threshold": threshold, "multi_label": multi_label})
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        option, hint = _OPTION_HINTS.get(field, ("zero-shot options", None))
        raise UserError(f"{option}: {error['msg'].removeprefix('Value error, ')}", hint,
                        USAGE) from None


zero_shot_options = [
    click.option("--labels", help="comma-separated candidate labels (zero-shot)"),
    click.option("--templates", default="default",
                 help="'default', 'openai_imagenet', 'simple_imagenet' or templates joined by |"),
    click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1)),
    click.option("--threshold", type=click.FloatRange(0.0, 1.0), default=None,
                 help="keep labels scoring at least this (0 to 1)"),
    click.option("--multi-label", is_flag=True),
]


def with_zero_shot(func: Any) -> Any:
    for option in reversed(zero_shot_options):
        func = option(func)
    return func


def _image_source(image: str) -> tuple[str, str | None]:
    """The job's source and etag: a relative local path made absolute (a worker has its own
    working directory), and a local file's identity (producer/bulk.py `source_etag`)."""
    if "://" not in image and not os.path.isabs(image):
        image = os.path.abspath(image)
    return image, source_etag(image)


@click.command()
@click.option("--model", default=None, help="model spec (default: DUALSTREAM_MODEL)")
@click.option("--image", default=None, help="s3://bucket/key, or a file in local mode")
@click.option("--text", default=None)
@with_zero_shot
@click.option("--wait", type=click.FloatRange(min=0), default=None,
              help="wait this many seconds for the result; exit status 1 if it failed")
@click.option("--force", is_flag=True, help="run the job again even if it is done")
def submit(model: str | None, image: str | None, text: str | None, labels: str | None,
           templates: str, top_k: int, threshold: float | None, multi_label: bool,
           wait: float | None, force: bool) -> None:
    """Submit one image or text job; prints its job id (or its result with --wait).

    A job that failed before runs again when submitted again; one that is done is not,
    unless --force."""
    if (image is None) == (text is None):
        raise UserError("give one of --image and --text",
                        "--image s3://bucket/key (or a file in local mode), or --text 'words'",
                        USAGE)
    if text is not None and labels is not None:
        raise UserError("--labels scores an image, not a text", "use --image with --labels",
                        USAGE)
    options = _zero_shot(labels, templates, top_k, threshold, multi_label)
    client = _client(model, needs_model=True)
    chosen = client._model(model)
    task = Task.TEXT_EMBEDDING if text is not None else (
        Task.ZERO_SHOT if options else Task.IMAGE_EMBEDDING)
    source, etag = _image_source(image) if image is not None else (None, None)
    job = Job(task=task, model=chosen, image=source, text=text, zero_shot=options, etag=etag)
    job_id = client.submit(job, force=force)
    if wait is None:
        click.echo(job_id)
        return
    try:
        result = client.result(job_id, timeout=wait)
    except ResultTimeout:
        raise UserError(f"job {job_id} is not finished after {wait:g} s",
                        f"`dualstream results {job_id}` reads it later") from None
    click.echo(_result_json(result))
    if result.error is not None:
        raise UserError(f"job {job_id} failed: [{result.error.code}] {result.error.message}",
                        "fix the cause and submit it again: a failed job runs again")


def _result_json(result: JobResult) -> str:
    """The result as indented JSON, its embedding one array on one line."""
    text = json.dumps(result.model_dump(mode="json", exclude={"embedding"}), indent=2)
    if result.embedding is None:
        return text
    return text.removesuffix("\n}") + f',\n  "embedding": {json.dumps(result.embedding)}\n}}'


@click.command()
@click.argument("source")
@click.option("--model", default=None)
@with_zero_shot
@click.option("--suffix", "suffixes", multiple=True, help="only keys ending so (repeatable)")
@click.option("--per-message", default=32, show_default=True, type=click.IntRange(1, 256),
              help="jobs per queue message")
@click.option("--wait/--no-wait", default=False,
              help="wait for every job, with a progress bar; exit status 1 if any failed")
@click.option("--force", is_flag=True, help="run every job again, those done included")
def bulk(source: str, model: str | None, labels: str | None, templates: str, top_k: int,
         threshold: float | None, multi_label: bool, suffixes: tuple[str, ...],
         per_message: int, wait: bool, force: bool) -> None:
    """Submit every image under s3://bucket/prefix or a local folder.

    The same command is the same run: run again after an interruption (Ctrl-C), it goes on
    from where its listing stopped; run again once every job is settled, it lists again and
    sends what is not done (new or changed files, and failed jobs to retry)."""
    zero_shot = _zero_shot(labels, templates, top_k, threshold, multi_label)
    s3_source = source.startswith("s3://")
    if not s3_source and not local_path(source).is_dir():
        raise UserError(f"no folder {source}", "give s3://bucket/prefix or a directory", USAGE)
    client = _client(model, needs_model=True)
    request = BulkRequest(source=source, model=client._model(model), zero_shot=zero_shot,
                          suffixes=suffixes or IMAGE_SUFFIXES)
    run = request.run_id
    progress = client.run_progress(run)
    if progress.listed and not progress.finished and not force:
        click.echo(f"run {run}: every job is already queued; {progress.queued - progress.settled}"
                   f" of {progress.queued} still to settle")
    else:
        _publish(client, request, progress, per_message, force)
    if wait:
        _wait_with_progress(client, run)


def _publish(client: Client, request: BulkRequest, progress: RunProgress, per_message: int,
             force: bool) -> None:
    run = request.run_id
    s3 = None
    if request.source.startswith("s3://"):
        from control.connections import s3_client

        s3 = s3_client(client.settings)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    holder = client.runs.lock_holder(run)
    if holder is not None and _dead_here(holder):
        client.runs.unlock(run, holder)  # a killed `bulk` on this machine: take over
    if not client.runs.lock(run, owner, RUN_LOCK_TTL_S):
        raise UserError(f"another `dualstream bulk` is publishing run {run}",
                        f"wait for it (or up to {RUN_LOCK_TTL_S} s if it died)")
    click.echo(f"run {run}: publishing {request.source} (interrupted, the same command "
               "resumes it)")
    try:
        queued_before = progress.queued
        resume_after = None
        if progress.exists and not progress.listed:
            resume_after = progress.cursor
            click.echo(f"run {run}: resuming after {resume_after or 'the start'}", err=True)
        else:
            client.runs.new_pass(run)
        sources = list_sources(request.source, request.suffixes, s3, after=resume_after)
        jobs = tqdm(_holding(client, run, owner, jobs_for(request, sources)),
                    desc="submitting", unit="job", file=sys.stderr)
        ids = client.submit_many(jobs, per_message=per_message, run_id=run, force=force)
        client.runs.listed(run)
    except KeyboardInterrupt:
        queued = client.run_progress(run).queued
        raise UserError(f"interrupted: run {run} has {queued} jobs queued",
                        f"run the same command again to resume it: {_same_command()}",
                        INTERRUPTED) from None
    finally:
        client.runs.unlock(run, owner)
    progress = client.run_progress(run)
    click.echo(f"run {run}: {len(ids)} jobs listed, {progress.queued - queued_before} "
               f"newly queued, {progress.queued} in all")


def _same_command() -> str:
    return shlex.join(["dualstream", *sys.argv[1:]])


RUN_LOCK_TTL_S = 30


def _dead_here(holder: str) -> bool:
    """Whether a lock holder (`<host>-<pid>`) was a process of this machine that is gone."""
    host, _, pid = holder.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _holding(client: Client, run: str, owner: str, jobs: Iterator[Job]) -> Iterator[Job]:
    """The jobs, keeping the run's lock while they are listed."""
    renewed = time.monotonic()
    for job in jobs:
        if time.monotonic() - renewed > RUN_LOCK_TTL_S / 3:
            if not client.runs.lock(run, owner, RUN_LOCK_TTL_S):
                raise UserError(f"lost the lock of run {run} to another producer")
            renewed = time.monotonic()
        yield job


def _follow(client: Client, run_id: str, file: TextIO) -> RunProgress:
    """Wait for a run with a progress bar: settled of queued, done and failed, rate and ETA,
    from the run's counters (one read a poll, however many jobs it has)."""
    first = client.run_progress(run_id)
    with tqdm(desc=run_id, unit="job", file=file, total=first.queued,
              initial=first.settled) as bar:
        def show(progress: RunProgress) -> None:
            bar.total = progress.queued
            bar.set_postfix_str(f"done {progress.done}, failed {progress.failed}"
                                + ("" if progress.listed else ", still listing"),
                                refresh=False)
            bar.update(progress.settled - bar.n)

        return client.wait_run(run_id, on_progress=show)


def _wait_with_progress(client: Client, run_id: str) -> None:
    try:
        progress = _follow(client, run_id, sys.stderr)
    except KeyboardInterrupt:
        raise UserError(f"stopped waiting; run {run_id} goes on",
                        f"`dualstream status {run_id}` follows it", INTERRUPTED) from None
    click.echo(json.dumps(_run_summary(progress)))
    if progress.failed:
        raise UserError(_failures(progress), f"`dualstream results {run_id}` lists them; run "
                        "the same command again to retry them once fixed")


def _failures(progress: RunProgress) -> str:
    codes = ", ".join(f"{code} {count}" for code, count
                      in sorted(progress.failed_by_code.items(), key=lambda c: -c[1]))
    return (f"run {progress.run_id}: {progress.failed} of {progress.queued} jobs failed"
            + (f" ({codes})" if codes else ""))


def _run_summary(progress: RunProgress) -> dict[str, Any]:
    return {"run": progress.run_id, "queued": progress.queued, "done": progress.done,
            "failed": progress.failed, "failed_by_code": progress.failed_by_code,
            "listed": progress.listed, "finished": progress.finished}


def _run(client: Client, run_id: str) -> RunProgress:
    progress = client.run_progress(run_id)
    if not progress.exists:
        raise UserError(f"no run {run_id}", "`dualstream bulk` prints its run's id; runs are "
                        "kept for DUALSTREAM_RESULT_TTL_S (7 days)")
    return progress


@click.command()
@click.argument("ref")
@click.option("--follow/--no-follow", default=None,
              help="for a run: a live progress bar until it finishes, then a summary "
              "(default: when stdout is a terminal; otherwise one JSON line)")
def status(ref: str, follow: bool | None) -> None:
    """Status of a job id (exit status 1 if unknown), or a run's counters for a run id."""
    client = _client()
    if ref.startswith("run-"):
        progress = _run(client, ref)
        if follow is None:
            follow = sys.stdout.isatty()
        if not follow:
            click.echo(json.dumps(_run_summary(progress)))
            return
        try:
            if not progress.finished:
                progress = _follow(client, ref, sys.stdout)
        except KeyboardInterrupt:  # stopped watching: the run goes on
            progress = client.run_progress(ref)
        state = "finished" if progress.finished else "still running"
        failed = _failures(progress).split(": ", 1)[1] if progress.failed else "none failed"
        click.echo(f"run {ref} {state}: {progress.done} done of {progress.queued}; {failed}")
        return
    found = client.status(ref)
    if found is None:
        raise UserError(f"no job {ref}", "check the id; a bulk job has no record until it "
                        "settles, and records are kept for DUALSTREAM_RESULT_TTL_S (7 days)")
    click.echo(found.value)


@click.command()
@click.argument("ref")
@click.option("--embeddings/--no-embeddings", default=False,
              help="include embeddings, base64 of little-endian float32 (`embedding_b64`)")
def results(ref: str, embeddings: bool) -> None:
    """A job's result as JSON; for a run, its counters, then one line per failed job (its
    rows are in the output store's shards)."""
    client = _client()
    if ref.startswith("run-"):
        progress = _run(client, ref)
        click.echo(json.dumps(_run_summary(progress)))
        for job_id, code, source in client.runs.failures(ref):
            click.echo(json.dumps({"job_id": job_id, "status": "failed", "code": code,
                                   "source": source}))
        return
    result = client.results.get(ref)
    if result is None:
        raise UserError(f"no result for {ref}", "check the id; a bulk job has no record until "
                        "it settles, and records are kept for DUALSTREAM_RESULT_TTL_S (7 days)")
    click.echo(_result_line(result, embeddings))


def _result_line(result: JobResult, embeddings: bool) -> str:
    line = result.model_dump(mode="json", exclude={"embedding"})
    if embeddings and result.embedding is not None:
        line["embedding_b64"] = embedding_b64(result.embedding)
    return json.dumps(line)


@click.group()
def dlq() -> None:
    """Inspect, replay and purge the dead-letter store (jobs and messages that failed for good,
    and messages a worker was lost on every time)."""


def _dead_letters() -> Any:
    from control.connections import redis_client
    from control.deadletters import DeadLetterStore

    settings = Settings()
    return DeadLetterStore.for_settings(redis_client(settings), settings)


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per dead letter")
def dlq_list(as_json: bool) -> None:
    """One line per dead letter, oldest first: id, code, deliveries, error, payload."""
    from control.deadletters import payload_preview

    for letter in _dead_letters().list():
        if as_json:
            click.echo(letter.model_dump_json())
            continue
        payload = (f"<{letter.content_type}, undecoded>" if letter.raw_body is not None
                   else payload_preview(letter.payload, 80))
        click.echo(f"{letter.id}  {letter.code}  deliveries={letter.deliveries}  "
                   f"{letter.error[:80]}  {payload}")


@dlq.command("show")
@click.argument("letter_id")
def dlq_show(letter_id: str) -> None:
    """A dead letter in full: payload, error code, last error, deliveries, queue."""
    letter = _dead_letters().get(letter_id)
    if letter is None:
        raise click.ClickException(f"no dead letter {letter_id}")
    click.echo(letter.model_dump_json(indent=2))


def _replayable_message(letter: Any) -> JobMessage:
    if not letter.replayable:
        raise click.ClickException(
            f"dead letter {letter.id} never decoded ({letter.content_type}); it cannot be "
            "replayed: fix the producer and send the jobs again")
    payload = letter.payload
    if not (isinstance(payload, dict) and "jobs" in payload):
        payload = {"jobs": [payload]}
    try:
        return JobMessage.model_validate(payload)
    except ValidationError as exc:
        raise click.ClickException(
            f"dead letter {letter.id} is not a valid job message, so it cannot be replayed as "
            f"it is: {exc.error_count()} errors, e.g. {exc.errors()[0]['msg']}") from exc


@dlq.command("replay")
@click.argument("letter_ids", nargs=-1)
@click.option("--all", "replay_all", is_flag=True, help="replay every replayable dead letter")
def dlq_replay(letter_ids: tuple[str, ...], replay_all: bool) -> None:
    """Re-submit dead letters' jobs to their model's queue, then remove them from the store.

    Jobs that have finished since are not re-sent. A message quarantined for killing its
    workers goes through the same checks again, so replay it once its cause is fixed. Named
    letters are replayed all or none; `--all` skips (and names) those that cannot be replayed.
    """
    store = _dead_letters()
    if replay_all:
        letters = [letter for letter in store.list() if letter.replayable]
    else:
        letters = [store.get(letter_id) for letter_id in letter_ids]
        missing = [i for i, letter in zip(letter_ids, letters, strict=True) if letter is None]
        if missing or not letters:
            raise click.ClickException(f"no dead letter {', '.join(missing) or '(none given)'}")
    ready = []
    for letter in letters:
        try:
            ready.append((letter, _replayable_message(letter)))
        except click.ClickException as exc:
            if not replay_all:
                raise
            click.echo(f"skipped {letter.id}: {exc.message}", err=True)
    client = _client()
    for letter, message in ready:
        ids = client.submit_many(message.jobs, per_message=len(message.jobs),
                                 run_id=message.run_id, count_in_run=False)
        store.remove(letter.id)
        click.echo(f"replayed {letter.id}: {len(ids)} jobs")


@dlq.command("purge")
@click.confirmation_option(prompt="Delete every dead letter?")
def dlq_purge() -> None:
    """Delete every dead letter."""
    click.echo(f"purged {_dead_letters().purge()}")


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None)
def schema(out: Path | None) -> None:
    """Export the JSON Schemas of jobs, messages and results."""
    schemas: dict[str, type[BaseModel]] = {"job": Job, "job_message": JobMessage,
                                           "job_result": JobResult}
    if out is None:
        click.echo(json.dumps({k: m.model_json_schema() for k, m in schemas.items()}, indent=2))
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, model in schemas.items():
        (out / f"{name}.schema.json").write_text(json.dumps(model.model_json_schema(), indent=2))
    click.echo(f"wrote {len(schemas)} schemas to {out}")


@click.command("queue-name")
@click.option("--model", required=True)
def queue_name_command(model: str) -> None:
    """Print the queue (Redis list) that a model's jobs go to, e.g. for KEDA."""
    from schemas.keys import queue_name

    click.echo(queue_name(model))


COMMANDS = [submit, bulk, status, results, dlq, schema, queue_name_command]
