"""The commands that put outputs to use: `export` (a run's rows for vector-index tools) and
`search` (text → images, image → images over an export)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from control.connections import redis_client
from control.objects import LocalOutputStore, S3OutputStore, output_store
from schemas.keys import RedisKeys
from schemas.settings import Settings


def _store(location: str, settings: Settings) -> LocalOutputStore | S3OutputStore:
    if location.startswith("s3://"):
        from control.connections import s3_client

        return S3OutputStore(location, s3_client(settings))
    Path(location).mkdir(parents=True, exist_ok=True)
    return LocalOutputStore(location)


@click.command()
@click.argument("run_id")
@click.option("--to", "target", required=True, help="a folder, or s3://bucket/prefix")
@click.option("--rows-per-file", type=int, default=100_000, show_default=True)
def export(run_id: str, target: str, rows_per_file: int) -> None:
    """Write a run's committed rows, one per job, as .npy + .parquet files that
    embedding_reader and autofaiss read (see worker/export.py for the layout)."""
    from worker.export import export_run

    settings = Settings()
    summary = export_run(run_id, output_store(settings), _store(target, settings),
                         client=redis_client(settings), keys=RedisKeys(settings.key_prefix),
                         rows_per_file=rows_per_file)
    click.echo(json.dumps(summary.as_dict()))
    if not any(summary.rows.values()):
        raise click.ClickException(f"run {run_id} has no committed rows under "
                                   f"{settings.output_uri}")


@click.command()
@click.option("--export", "export_dir", required=True, help="what `dualstream export` wrote")
@click.option("--text", default=None, help="find the images nearest this text")
@click.option("--image", default=None, type=click.Path(exists=True, dir_okay=False),
              help="find the images nearest this image file")
@click.option("--model", default=None, help="the model that made the export "
              "(default: DUALSTREAM_MODEL)")
@click.option("-k", "k", type=int, default=10, show_default=True)
def search(export_dir: str, text: str | None, image: str | None, model: str | None,
           k: int) -> None:
    """Nearest images of an export to a text (any language the model reads: Chinese with
    AltCLIP) or to an image; one JSON line per hit, best first."""
    from worker.embed import embed_images, embed_texts
    from worker.models.loader import load_encoder
    from worker.search import ExportIndex

    if (text is None) == (image is None):
        raise click.UsageError("give --text or --image, one of them")
    settings = Settings()
    spec = model or settings.model
    if not spec:
        raise click.UsageError("no model: pass --model or set DUALSTREAM_MODEL")
    index = ExportIndex.load(_store(export_dir, settings), "image")
    encoder = load_encoder(spec, device=settings.device)
    if text is not None:
        query = embed_texts(encoder, [text])[0][0]
    else:
        query = embed_images(encoder, [Path(image or "").read_bytes()])[0]
    for hit in index.search(query.numpy(), k):
        click.echo(json.dumps({"score": round(hit.score, 6), "job_id": hit.job_id,
                               "source": hit.source}, ensure_ascii=False))


COMMANDS = [export, search]
