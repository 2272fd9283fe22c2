"""Object storage both sides use: `s3://` locations, S3 listings and error meanings, local
paths, and the durable output root (an S3 prefix or a local directory)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from botocore.exceptions import BotoCoreError, ClientError

from control.connections import s3_client
from schemas.errors import ErrorCode, SourceError, TransientError
from schemas.settings import Settings

_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId"}


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        """`s3://bucket/key`; the key is everything after the bucket's slash, as S3 has it
        (`#` and `?` are key characters, not a URL's fragment and query)."""
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if not uri.startswith("s3://") or not bucket:
            raise SourceError(f"not an s3://bucket/key URI: {uri!r}", code=ErrorCode.INVALID_JOB)
        return cls(bucket, key)


def s3_error(exc: ClientError, what: str) -> Exception:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in _NOT_FOUND or status == 404:
        return SourceError(f"{what} does not exist ({code})", code=ErrorCode.SOURCE_NOT_FOUND)
    if code in _DENIED or status == 403:
        return SourceError(f"access to {what} was denied ({code})", code=ErrorCode.ACCESS_DENIED)
    return TransientError(f"S3 error reading {what}: {code or status}")


def local_identity(stat: os.stat_result) -> str:
    """A local file's identity: its mtime in nanoseconds and its size, in hex. Producers put it
    in a local job (its `etag`, so part of its id: a file changed in place is a new job), and
    the worker checks it before reading (`source_changed` when it differs)."""
    return f"{stat.st_mtime_ns:x}-{stat.st_size:x}"


def local_path(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path) if uri.startswith("file://") else uri)


class OutputStore(Protocol):
    """Durable output root: keys are relative paths under it."""

    root: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str) -> Iterator[str]: ...
    def uri(self, key: str) -> str: ...


class LocalOutputStore:
    def __init__(self, root: str) -> None:
        self.root = root
        self._dir = local_path(root)

    def put(self, key: str, data: bytes) -> None:
        target = self._dir / key
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)

    def get(self, key: str) -> bytes | None:
        try:
            return (self._dir / key).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return (self._dir / key).is_file()

    def delete(self, key: str) -> None:
        (self._dir / key).unlink(missing_ok=True)

    def list(self, prefix: str) -> Iterator[str]:
        base = self._dir / prefix
        if base.is_dir():
            for path in sorted(base.rglob("*")):
                if path.is_file() and not path.name.startswith(".tmp-"):
                    yield path.relative_to(self._dir).as_posix()

    def stamps(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(key, stamp) under a prefix; a file's stamp changes when it is rewritten."""
        for key in self.list(prefix):
            try:
                yield key, local_identity((self._dir / key).stat())
            except FileNotFoundError:
                continue  # removed since it was listed

    def uri(self, key: str) -> str:
        return (self._dir / key).resolve().as_uri()


class S3OutputStore:
    def __init__(self, root: str, s3: Any) -> None:
        self.root = root
        loc = S3Location.parse(root)
        self._bucket, self._prefix = loc.bucket, loc.key.strip("/")
        self._s3 = s3

    def _key(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    def put(self, key: str, data: bytes) -> None:
        try:
            self._s3.put_object(Bucket=self._bucket, Key=self._key(key), Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise TransientError(f"writing {self.uri(key)} failed: {exc}") from exc

    def get(self, key: str) -> bytes | None:
        try:
            response = self._s3.get_object(Bucket=self._bucket, Key=self._key(key))
            return bytes(response["Body"].read())
        except ClientError as exc:
            # Only a missing object is None: a refusal must not read as "never written".
            error = s3_error(exc, key)
            if isinstance(error, SourceError) and error.code is ErrorCode.SOURCE_NOT_FOUND:
                return None
            raise TransientError(f"reading {self.uri(key)} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise TransientError(f"reading {self.uri(key)} failed: {exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self._bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if isinstance(s3_error(exc, key), SourceError):
                return False
            raise TransientError(f"checking {self.uri(key)} failed: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self._s3.delete_object(Bucket=self._bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise TransientError(f"deleting {self.uri(key)} failed: {exc}") from exc

    def list(self, prefix: str) -> Iterator[str]:
        start = len(self._prefix) + 1 if self._prefix else 0
        for key in iter_s3_keys(self._s3, self._bucket, self._key(prefix)):
            yield key[start:]

    def stamps(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(key, ETag) under a prefix, in one listing; a missing bucket or a refusal is a
        `SourceError`, anything else a `TransientError`."""
        start = len(self._prefix) + 1 if self._prefix else 0
        try:
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=self._key(prefix))
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"][start:], str(item.get("ETag", ""))
        except ClientError as exc:
            raise s3_error(exc, self.uri(prefix)) from exc
        except BotoCoreError as exc:
            raise TransientError(f"listing {self.uri(prefix)} failed: {exc}") from exc

    def uri(self, key: str) -> str:
        return f"s3://{self._bucket}/{self._key(key)}"


def iter_s3_keys(s3: Any, bucket: str, prefix: str, after: str | None = None) -> Iterator[str]:
    """Every key under a prefix (only those after `after`, in S3's order), following
    pagination."""
    paginator = s3.get_paginator("list_objects_v2")
    extra = {"StartAfter": after} if after else {}
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix, **extra):
        for item in page.get("Contents", []):
            yield item["Key"]


def output_store(settings: Settings, s3: Any | None = None) -> OutputStore:
    if settings.output_uri.startswith("s3://"):
        return S3OutputStore(settings.output_uri, s3 if s3 is not None else s3_client(settings))
    return LocalOutputStore(settings.output_uri)
