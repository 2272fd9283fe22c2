"""Reading a job's source bytes: `s3://` objects, files under the local root, allowed http(s).

Sources are limited to `s3://` (optionally to an allow-list of buckets), in local mode to files
under `local_root`, and to http(s) only on hosts the settings allow (`worker/http_source.py`
guards those fetches against private addresses), so a job cannot make the worker reach an
arbitrary host.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR, S_ISREG
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from control.connections import s3_client
from control.objects import S3Location, local_identity, local_path, s3_error
from schemas.errors import ErrorCode, SourceError, TransientError
from schemas.settings import Settings
from worker import http_source

_NO_LOCAL_ROOT = ("local files are read only in local mode: set DUALSTREAM_LOCAL_ROOT on the "
                  "worker to a directory the files lie under")
_NO_CREDENTIALS = ("no AWS credentials: give the worker AWS_ACCESS_KEY_ID and "
                   "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a role (IRSA: AWS_ROLE_ARN and "
                   "AWS_WEB_IDENTITY_TOKEN_FILE)")

# S3's answers to a conditional or versioned read that name no such content.
_CHANGED = {"PreconditionFailed", "412"}
_BAD_VERSION = {"NoSuchVersion", "InvalidArgument"}  # a version id S3 cannot parse


def _error_code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {})
               .get("HTTPStatusCode", ""))


@dataclass(frozen=True)
class Blob:
    data: bytes
    etag: str | None


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

    def read(self, uri: str, *, version: str | None = None, etag: str | None = None) -> Blob:
        """The source's bytes; for S3, exactly `version` when given, and only if its ETag is
        still `etag` when given (else `source_changed`: the job named other content); for a
        local file, only if its identity (mtime and size) is still `etag` when given."""
        if uri.startswith("s3://"):
            return self._read_s3(S3Location.parse(uri), version, etag)
        if version is not None:
            raise SourceError(f"{uri!r} has no versions: only s3:// sources do",
                              code=ErrorCode.INVALID_JOB)
        if uri.startswith(("http://", "https://")) and self._http is not None:
            data, etag = http_source.fetch(uri, self._http)
            return Blob(data, etag)
        if uri.startswith("file://") or "://" not in uri:
            return self._read_local(uri, etag)
        raise SourceError(
            f"source {uri!r} is not allowed: use s3://bucket/key"
            + (" or a file under the local root" if self._root else ""),
            code=ErrorCode.SOURCE_NOT_ALLOWED,
        )

    def _read_s3(self, loc: S3Location, version: str | None, etag: str | None) -> Blob:
        allowed = self._settings.allowed_buckets
        if allowed and loc.bucket not in allowed:
            raise SourceError(
                f"bucket {loc.bucket!r} is not in the allowed buckets",
                code=ErrorCode.SOURCE_NOT_ALLOWED,
            )
        what = f"s3://{loc.bucket}/{loc.key}" + (f" (version {version})" if version else "")
        request = {"Bucket": loc.bucket, "Key": loc.key}
        if version is not None:
            request["VersionId"] = version
        if etag is not None:
            request["IfMatch"] = f'"{etag}"'
        try:
            response = self.s3.get_object(**request)
        except ClientError as exc:
            if _error_code(exc) in _CHANGED:
                raise SourceError(f"{what} is no longer the object with ETag {etag}",
                                  code=ErrorCode.SOURCE_CHANGED) from exc
            if version is not None and _error_code(exc) in _BAD_VERSION:
                raise SourceError(f"{what} does not exist ({_error_code(exc)})",
                                  code=ErrorCode.SOURCE_NOT_FOUND) from exc
            raise s3_error(exc, what) from exc
        except NoCredentialsError as exc:  # retrying cannot help: the worker lacks them
            raise SourceError(f"{_NO_CREDENTIALS}, to read {what}",
                              code=ErrorCode.ACCESS_DENIED) from exc
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

    def _read_local(self, uri: str, etag: str | None) -> Blob:
        if self._root is None:
            raise SourceError(f"{uri}: {_NO_LOCAL_ROOT}", code=ErrorCode.SOURCE_NOT_ALLOWED)
        path = local_path(uri).resolve()
        if not path.is_relative_to(self._root):
            raise SourceError(f"{path} lies outside the local root {self._root} "
                              "(DUALSTREAM_LOCAL_ROOT)", code=ErrorCode.SOURCE_NOT_ALLOWED)
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
            _check_identity(stat, etag, path)
        except BaseException:
            os.close(fd)
            raise
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(limit + 1)  # the file may have grown since the fstat
        self._check_size(len(data), str(path))
        return Blob(data, local_identity(stat))

    def _check_size(self, size: int, what: str) -> None:
        if size > self._settings.max_image_bytes:
            raise SourceError(
                f"{what} is {size} bytes, over the limit of {self._settings.max_image_bytes}",
                code=ErrorCode.SOURCE_TOO_LARGE,
            )


def _check_identity(stat: os.stat_result, etag: str | None, path: Path) -> None:
    if etag is not None and local_identity(stat) != etag:
        raise SourceError(f"{path} changed since the job was made (its identity is "
                          f"{local_identity(stat)}, the job names {etag}): submit it again",
                          code=ErrorCode.SOURCE_CHANGED)
