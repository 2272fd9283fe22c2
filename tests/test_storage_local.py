"""Local-mode sources: every way a file can be unreadable has its own code, and the etag
follows the file's content."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from schemas.errors import ErrorCode, SourceError
from schemas.settings import Settings
from worker.sources import SourceReader


@pytest.fixture
def reader(tmp_path: Path) -> SourceReader:
    return SourceReader(Settings(local_root=str(tmp_path / "root"), max_image_bytes=1000))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


def code_of(reader: SourceReader, uri: str) -> ErrorCode:
    with pytest.raises(SourceError) as caught:
        reader.read(uri)
    return caught.value.code


def test_a_file_under_the_root_is_read_with_an_etag(reader: SourceReader, root: Path) -> None:
    (root / "a.jpg").write_bytes(b"x" * 10)
    blob = reader.read(str(root / "a.jpg"))
    assert blob.data == b"x" * 10
    assert blob.etag and reader.read((root / "a.jpg").as_uri()).etag == blob.etag


def test_the_etag_changes_when_the_file_does(reader: SourceReader, root: Path) -> None:
    path = root / "a.jpg"
    path.write_bytes(b"one")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = reader.read(str(path)).etag
    path.write_bytes(b"two")  # the same size: only the modification time tells them apart
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))
    assert reader.read(str(path)).etag != before


def test_missing_and_directory_sources_are_not_found(reader: SourceReader, root: Path) -> None:
    (root / "folder").mkdir()
    assert code_of(reader, str(root / "missing.jpg")) is ErrorCode.SOURCE_NOT_FOUND
    assert code_of(reader, str(root / "folder")) is ErrorCode.SOURCE_NOT_FOUND


def test_a_file_over_the_byte_limit_is_too_large(reader: SourceReader, root: Path) -> None:
    (root / "big.jpg").write_bytes(b"x" * 1001)
    assert code_of(reader, str(root / "big.jpg")) is ErrorCode.SOURCE_TOO_LARGE


def test_paths_and_links_out_of_the_root_are_not_allowed(reader: SourceReader, root: Path,
                                                         tmp_path: Path) -> None:
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (root / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    assert code_of(reader, str(tmp_path / "secret.jpg")) is ErrorCode.SOURCE_NOT_ALLOWED
    assert code_of(reader, str(root / ".." / "secret.jpg")) is ErrorCode.SOURCE_NOT_ALLOWED
    assert code_of(reader, str(root / "link.jpg")) is ErrorCode.SOURCE_NOT_ALLOWED


def test_an_unreadable_file_is_access_denied(reader: SourceReader, root: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root here, which reads any file whatever its mode: refuse the open instead.
    path = root / "locked.jpg"
    path.write_bytes(b"x")
    real_open = os.open

    def refuse(name: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(name) == path:
            raise PermissionError(13, "Permission denied", str(name))
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    assert code_of(reader, str(path)) is ErrorCode.ACCESS_DENIED


def test_a_fifo_under_the_root_is_refused_without_blocking(
    reader: SourceReader, root: Path
) -> None:
    os.mkfifo(root / "pipe.jpg")  # opening it for reading would block until a writer came
    assert code_of(reader, str(root / "pipe.jpg")) is ErrorCode.SOURCE_NOT_FOUND


def test_a_file_that_grows_past_the_limit_after_the_check_is_still_too_large(
    reader: SourceReader, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = root / "growing.jpg"
    path.write_bytes(b"x" * 1500)
    real_fstat = os.fstat

    def stale_fstat(fd: int) -> os.stat_result:  # the size as it was before the file grew
        found = real_fstat(fd)
        return os.stat_result((*found[:6], 10, *found[7:]))

    monkeypatch.setattr(os, "fstat", stale_fstat)
    assert code_of(reader, str(path)) is ErrorCode.SOURCE_TOO_LARGE
