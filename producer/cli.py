"""Producer commands: submit, bulk, status, results, dlq, schema. No torch is imported here."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from pydantic import BaseModel, ValidationError
from tqdm import tqdm

from producer.bulk import IMAGE_SUFFIXES, BulkRequest, jobs_for, list_sources
from producer.client import Client
from schemas.jobs import Job, JobMessage, Task, ZeroShotOptions
from schemas.records import embedding_b64
from schemas.results import JobResult, RunProgress
from schemas.settings import Settings


def _client(model: str | None = None) -> Client:
    settings = Settings()
    if model:
        settings = settings.model_copy(update={"model": model})
    return Client(settings)


def _zero_shot(labels: str | None, templates: str, top_k: int,
               threshold: float | None, multi_label: bool) -> ZeroShotOptions | None:
    if not labels:
        return None
    names = ("default", "openai_imagenet", "simple_imagenet")
    chosen = templates if templates in names else templates.split("|")
    return ZeroShotOptions.model_validate({
        "labels": [x.strip() for x in labels.split(",")], "templates": chosen, "top_k": top_k,
        "threshold": threshold, "multi_label": multi_label})


zero_shot_options = [
    click.option("--labels", help="comma-separated candidate labels (zero-shot)"),
    click.option("--templates", default="default",
                 help="'default', 'openai_imagenet', 'simple_imagenet' or templates joined by |"),
    click.option("--top-k", default=5, show_default=True),
    click.option("--threshold", type=float, default=None),
    click.option("--multi-label", is_flag=True),
]


def with_zero_shot(func: Any) -> Any:
    for option in reversed(zero_shot_options):
        func = option(func)
    return func


@click.command()
@click.option("--model", default=None, help="model spec (default: DUALSTREAM_MODEL)")
@click.option("--image", default=None, help="s3://bucket/key, or a file in local mode")
@click.option("--text", default=None)
@with_zero_shot
@click.option("--wait", type=float, default=None, help="wait this many seconds for the result")
def submit(model: str | None, image: str | None, text: str | None, labels: str | None,
           templates: str, top_k: int, threshold: float | None, multi_label: bool,
           wait: float | None) -> None:
    """Submit one image or text job; prints its job id (or its result with --wait)."""
    client = _client(model)
    options = _zero_shot(labels, templates, top_k, threshold, multi_label)
    task = Task.TEXT_EMBEDDING if text is not None else (
        Task.ZERO_SHOT if options else Task.IMAGE_EMBEDDING)
    job = Job(task=task, model=client._model(model), image=image, text=text, zero_shot=options)
    job_id = client.submit(job)
    if wait is None:
        click.echo(job_id)
    else:
        click.echo(client.result(job_id, timeout=wait).model_dump_json(indent=2))


@click.command()
@click.argument("source")
@click.option("--model", default=None)
@with_zero_shot
@click.option("--suffix", "suffixes", multiple=True, help="only keys ending so (repeatable)")
@click.option("--per-message", default=32, show_default=True, help="jobs per queue message")
@click.option("--wait/--no-wait", default=False, help="wait for every job, with a progress bar")
def bulk(source: str, model: str | None, labels: str | None, templates: str, top_k: int,
         threshold: float | None, multi_label: bool, suffixes: tuple[str, ...],
         per_message: int, wait: bool) -> None:
    """Submit every image under s3://bucket/prefix or a local folder.

    The same command is the same run: run again after an interruption, it goes on from where
    its listing stopped; run again once every job is settled, it lists again and sends what
    is not done (new objects, and failed jobs to retry)."""
    client = _client(model)
    request = BulkRequest(source=source, model=client._model(model),
                          zero_shot=_zero_shot(labels, templates, top_k, threshold, multi_label),
                          suffixes=suffixes or IMAGE_SUFFIXES)
    s3 = None
    if source.startswith("s3://"):
        from control.connections import s3_client

        s3 = s3_client(client.settings)
    run = request.run_id
    progress = client.run_progress(run)
    if progress.listed and not progress.finished:
        click.echo(f"run {run}: every job is already queued; {progress.queued - progress.settled}"
                   f" of {progress.queued} still to settle")
    else:
        owner = f"{socket.gethostname()}-{os.getpid()}"
        holder = client.runs.lock_holder(run)
        if holder is not None and _dead_here(holder):
            client.runs.unlock(run, holder)  # a killed `bulk` on this machine: take over
        if not client.runs.lock(run, owner, RUN_LOCK_TTL_S):
            raise click.ClickException(f"another `dualstream bulk` is publishing run {run}; "
                                       f"wait for it (or up to {RUN_LOCK_TTL_S} s if it died)")
        try:
            queued_before = progress.queued
            resume_after = None
            if progress.exists and not progress.listed:
                resume_after = progress.cursor
                click.echo(f"run {run}: resuming after {resume_after or 'the start'}", err=True)
            else:
                client.runs.new_pass(run)
            sources = list_sources(source, request.suffixes, s3, after=resume_after)
            jobs = tqdm(_holding(client, run, owner, jobs_for(request, sources)),
                        desc="submitting", unit="job", file=sys.stderr)
            ids = client.submit_many(jobs, per_message=per_message, run_id=run)
            client.runs.listed(run)
        finally:
            client.runs.unlock(run, owner)
        progress = client.run_progress(run)
        click.echo(f"run {run}: {len(ids)} jobs listed, {progress.queued - queued_before} "
                   f"newly queued, {progress.queued} in all")
    if wait:
        _wait_with_progress(client, run)


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
                raise click.ClickException(f"lost the lock of run {run} to another producer")
            renewed = time.monotonic()
        yield job


def _wait_with_progress(client: Client, run_id: str) -> None:
    with tqdm(desc="processing", unit="job", file=sys.stderr) as bar:
        def show(progress: RunProgress) -> None:
            bar.total = progress.queued
            bar.update(progress.settled - bar.n)

        progress = client.wait_run(run_id, on_progress=show)
    click.echo(json.dumps(_run_summary(progress)))


def _run_summary(progress: RunProgress) -> dict[str, Any]:
    return {"run": progress.run_id, "queued": progress.queued, "done": progress.done,
            "failed": progress.failed, "failed_by_code": progress.failed_by_code,
            "listed": progress.listed, "finished": progress.finished}


@click.command()
@click.argument("ref")
def status(ref: str) -> None:
    """Status of a job id, or a run's counters for a run id."""
    client = _client()
    if ref.startswith("run-"):
        progress = client.run_progress(ref)
        if not progress.exists:
            raise click.ClickException(f"no run {ref}")
        click.echo(json.dumps(_run_summary(progress)))
        return
    found = client.status(ref)
    click.echo(found.value if found else "unknown")


@click.command()
@click.argument("ref")
@click.option("--embeddings/--no-embeddings", default=False,
              help="include embeddings, base64 of little-endian float32 (`embedding_b64`)")
def results(ref: str, embeddings: bool) -> None:
    """A job's result as JSON; for a run, its counters, then one line per failed job (its
    rows are in the output store's shards)."""
    client = _client()
    if ref.startswith("run-"):
        progress = client.run_progress(ref)
        if not progress.exists:
            raise click.ClickException(f"no run {ref}")
        click.echo(json.dumps(_run_summary(progress)))
        for job_id, code, source in client.runs.failures(ref):
            click.echo(json.dumps({"job_id": job_id, "status": "failed", "code": code,
                                   "source": source}))
        return
    result = client.results.get(ref)
    if result is None:
        raise click.ClickException(f"no result for {ref}")
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
