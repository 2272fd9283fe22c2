"""Object storage: reading job sources and writing durable outputs, on S3 or a local directory.

Sources are limited to `s3://` (optionally to an allow-list of buckets) and, in local mode only,
to files under `local_root`. There is no generic URL fetching, so a job cannot make the worker
reach an arbitrary host.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from botocore.exceptions import BotoCoreError, ClientError

from schemas.errors import ErrorCode, SourceError, TransientError
from schemas.settings import Settings
from worker import http_source
from worker.connections import s3_client

_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled", "InvalidAccessKeyId"}


@dataclass(frozen=True)
class Blob:
    data: bytes
    etag: str | None


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise SourceError(f"not an s3://bucket/key URI: {uri!r}", code=ErrorCode.INVALID_JOB)
        return cls(parsed.netloc, parsed.path.lstrip("/"))


def _client_error(exc: ClientError, what: str) -> Exception:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in _NOT_FOUND or status == 404:
        return SourceError(f"{what} does not exist ({code})", code=ErrorCode.SOURCE_NOT_FOUND)
    if code in _DENIED or status == 403:
        return SourceError(f"access to {what} was denied ({code})", code=ErrorCode.ACCESS_DENIED)
    return TransientError(f"S3 error reading {what}: {code or status}")


def local_path(uri: str) -> Path:
    return Path(unquote(urlparse(uri).path) if uri.startswith("file://") else uri)


class SourceReader:
    """Reads a job's image bytes, enforcing the allowed schemes, buckets and byte limit."""

    def __init__(self, settings: Settings, s3: Any | None = None) -> None:
        self._settings = settings
        self._s3 = s3
        self._root = Path(settings.local_root).resolve() if settings.local_root else None
        self._http = http_source.HttpPolicy(
            tuple(settings.allowed_http_hosts), settings.max_image_bytes,
            settings.http_allow_private_networks) if settings.allowed_http_hosts else None

    @property
    def s3(self) -> Any:
        if self._s3 is None:
            self._s3 = s3_client(self._settings)
        return self._s3

    def read(self, uri: str) -> Blob:
        if uri.startswith("s3://"):
            return self._read_s3(S3Location.parse(uri))
        if uri.startswith(("http://", "https://")) and self._http is not None:
            data, etag = http_source.fetch(uri, self._http)
            return Blob(data, etag)
        if uri.startswith("file://") or (self._root is not None and "://" not in uri):
            return self._read_local(uri)
        raise SourceError(
            f"source {uri!r} is not allowed: use s3://bucket/key"
            + (" or a file under the local root" if self._root else ""),
            code=ErrorCode.SOURCE_NOT_ALLOWED,
        )

    def _read_s3(self, loc: S3Location) -> Blob:
        allowed = self._settings.allowed_buckets
        if allowed and loc.bucket not in allowed:
            raise SourceError(
                f"bucket {loc.bucket!r} is not in the allowed buckets",
                code=ErrorCode.SOURCE_NOT_ALLOWED,
            )
        what = f"s3://{loc.bucket}/{loc.key}"
        try:
            response = self.s3.get_object(Bucket=loc.bucket, Key=loc.key)
        except ClientError as exc:
            raise _client_error(exc, what) from exc
        except BotoCoreError as exc:
            raise TransientError(f"S3 unreachable reading {what}: {exc}") from exc
        body = response["Body"]
        try:
            self._check_size(int(response.get("ContentLength", 0)), what)
            data = body.read()
        except BotoCoreError as exc:
            raise TransientError(f"S3 read of {what} failed: {exc}") from exc
        finally:
            body.close()
        return Blob(data, str(response.get("ETag", "")).strip('"') or None)

    def _read_local(self, uri: str) -> Blob:
        if self._root is None:
            raise SourceError("local files are not allowed outside local mode",
                              code=ErrorCode.SOURCE_NOT_ALLOWED)
        path = local_path(uri).resolve()
        if not path.is_relative_to(self._root):
            raise SourceError(f"{path} lies outside the local root {self._root}",
                              code=ErrorCode.SOURCE_NOT_ALLOWED)
        limit = self._settings.max_image_bytes
        try:
            # One open and one fstat (each blocking call gives up the GIL and must win it
            # back). Non-blocking, so a FIFO under the root cannot hang a prepare thread.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise SourceError(f"{path} does not exist", code=ErrorCode.SOURCE_NOT_FOUND) from exc
        except PermissionError as exc:
            raise SourceError(f"{path} is not readable", code=ErrorCode.ACCESS_DENIED) from exc
        try:
            stat = os.fstat(fd)
            if not S_ISREG(stat.st_mode):
                kind = "a directory" if S_ISDIR(stat.st_mode) else "not a regular file"
                raise SourceError(f"{path} is {kind}", code=ErrorCode.SOURCE_NOT_FOUND)
            self._check_size(stat.st_size, str(path))
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(limit + 1)  # the file may have grown since the fstat
        self._check_size(len(data), str(path))
        return Blob(data, f"{stat.st_mtime_ns:x}-{stat.st_size:x}")

    def _check_size(self, size: int, what: str) -> None:
        if size > self._settings.max_image_bytes:
            raise SourceError(
                f"{what} is {size} bytes, over the limit of {self._settings.max_image_bytes}",
                code=ErrorCode.SOURCE_TOO_LARGE,
            )


class OutputStore(Protocol):
    """Durable output root: keys are relative paths under it."""

    root: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def exists(self, key: str) -> bool: ...
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

    def list(self, prefix: str) -> Iterator[str]:
        base = self._dir / prefix
        if base.is_dir():
            for path in sorted(base.rglob("*")):
                if path.is_file() and not path.name.startswith(".tmp-"):
                    yield path.relative_to(self._dir).as_posix()

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
            if isinstance(_client_error(exc, key), SourceError):
                return None
            raise TransientError(f"reading {self.uri(key)} failed: {exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self._bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if isinstance(_client_error(exc, key), SourceError):
                return False
            raise TransientError(f"checking {self.uri(key)} failed: {exc}") from exc

    def list(self, prefix: str) -> Iterator[str]:
        start = len(self._prefix) + 1 if self._prefix else 0
        for key in iter_s3_keys(self._s3, self._bucket, self._key(prefix)):
            yield key[start:]

    def uri(self, key: str) -> str:
        return f"s3://{self._bucket}/{self._key(key)}"


def iter_s3_keys(s3: Any, bucket: str, prefix: str) -> Iterator[str]:
    """Every key under a prefix, following pagination."""
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            yield item["Key"]


def output_store(settings: Settings, s3: Any | None = None) -> OutputStore:
    if settings.output_uri.startswith("s3://"):
        return S3OutputStore(settings.output_uri, s3 if s3 is not None else s3_client(settings))
    return LocalOutputStore(settings.output_uri)
