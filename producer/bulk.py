"""Bulk submission: every object under an S3 prefix (or every file under a local folder).

Listing is paginated and lazy, in a stable order (S3's key order; sorted paths locally), so a
run's cursor (the last source it published) tells an interrupted run where to go on; jobs go
out several per message.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

from control.objects import S3Location, iter_s3_keys, local_identity, local_path
from schemas.jobs import Job, Task, ZeroShotOptions

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


@dataclass(frozen=True)
class BulkRequest:
    source: str  # s3://bucket/prefix, file:///dir or a directory path
    model: str
    zero_shot: ZeroShotOptions | None = None
    suffixes: Sequence[str] = IMAGE_SUFFIXES
    return_embedding: bool = False

    @property
    def run_id(self) -> str:
        """The same request gives the same run, so re-running it resumes it."""
        options = self.zero_shot.model_dump_json() if self.zero_shot else ""
        key = f"{self.source}|{self.model}|{options}"
        return "run-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def list_sources(source: str, suffixes: Sequence[str], s3: object | None = None,
                 after: str | None = None) -> Iterator[str]:
    """Every source under `source` with one of the suffixes, in listing order; with `after`
    (a source this listing yielded before), only those that follow it."""
    wanted = tuple(s.lower() for s in suffixes)
    if source.startswith("s3://"):
        loc = S3Location.parse(source)
        if s3 is None:
            raise ValueError("an S3 client is needed to list s3:// sources")
        start = S3Location.parse(after).key if after else None
        for key in iter_s3_keys(s3, loc.bucket, loc.key, after=start):
            if key.lower().endswith(wanted):
                yield f"s3://{loc.bucket}/{key}"
        return
    root = local_path(source)
    if not root.is_dir():
        raise ValueError(f"{source} is neither s3://bucket/prefix nor a directory")
    for name in sorted(str(path) for path in Path(root).resolve().rglob("*")):
        path = Path(name)
        if (after is None or name > after) and path.is_file() and path.suffix.lower() in wanted:
            yield name


def is_local(source: str) -> bool:
    """Whether a source names a file (a path or `file://`), not an object or a URL."""
    return source.startswith("file://") or "://" not in source


def source_etag(source: str) -> str | None:
    """A local file's identity (control/objects.py `local_identity`), which the worker checks
    before reading. None for other sources, and for a file this machine cannot see (the worker
    then reads whatever the path holds)."""
    if not is_local(source):
        return None
    try:
        stat = os.stat(local_path(source))
    except (OSError, ValueError):
        return None
    return local_identity(stat) if S_ISREG(stat.st_mode) else None


def jobs_for(request: BulkRequest, sources: Iterator[str]) -> Iterator[Job]:
    task = Task.ZERO_SHOT if request.zero_shot else Task.IMAGE_EMBEDDING
    for source in sources:
        yield Job(task=task, image=source, model=request.model, zero_shot=request.zero_shot,
                  return_embedding=request.return_embedding, etag=source_etag(source))
