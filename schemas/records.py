"""A job's record in Redis: one string per job, the only per-job key dualstream keeps.

    q                           queued (single submissions; bulk jobs have none)
    d<run tag><done fields>     done once its shard is committed; until then, its row is
                                being written there (control/results.py)
    f<run tag><failed fields>   failed

A bulk job's record is most of what it costs Redis, so settled records are packed binary,
little-endian, and read with a few lines in any language:

    run tag      3 bytes: the first 3 bytes of SHA-256(run id), or 3 zero bytes without one;
                 the scripts in control/results.py compare them to count a job once per run
    finished at  5 bytes, unsigned: milliseconds since 2020-01-01 UTC (for a row being
                 written, when its writer reserved or last renewed it: its lease's age)
    attempts     u8 (capped at 255)
    done:   flags u8 (1 truncated text, 2 has a row, 4 has labels, 8 float32 embedding,
            16 float16 embedding), dim u16, row u16, shard id (text), labels (a varint
            count, then each as text), their scores (float32 each, best first), then the
            embedding when the job asked for it (float32 or float16, to the end)
    failed: error code (text), message (text)

A text is its UTF-8 length as a LEB128 varint (one byte below 128), then the bytes. A bulk
job's record with five labels is about 76 bytes, so that Redis keeps it in an 80-byte
allocation (docs/scaling.md).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Sequence
from typing import Literal

from schemas.errors import ErrorCode
from schemas.results import ErrorInfo, JobResult, LabelScore, OutputLocation, Status, Timings

NO_RUN = b"\0\0\0"
TIME_ORIGIN_MS = 1_577_836_800_000  # 2020-01-01: 5 bytes of milliseconds from it reach 2054
EmbeddingDtype = Literal["float32", "float16"]
_TRUNCATED, _ROW, _LABELS, _F32, _F16 = 1, 2, 4, 8, 16
_HEAD_SIZE = 9  # run tag (3), finished at (5), attempts (1)
_DONE = struct.Struct("<BHH")  # flags, dim, row
_STATES = {ord("q"): Status.QUEUED, ord("d"): Status.DONE, ord("f"): Status.FAILED}
_MAX_MESSAGE = 4000  # bytes of an error message a record keeps


def run_tag(run_id: str | None) -> bytes:
    return hashlib.sha256(run_id.encode()).digest()[:3] if run_id else NO_RUN


def shard_id_of(uri: str) -> str:
    """A shard's id from its vectors' URI (`…/<shard id>.npy`, schemas/keys.py ShardPaths)."""
    return uri.rsplit("/", 1)[-1].removesuffix(".npy")


def record_status(raw: bytes | None) -> Status | None:
    return _STATES.get(raw[0]) if raw else None


def record_shard(raw: bytes | None) -> str | None:
    """The shard a done record's row lives in, to resolve its URI."""
    if not raw or raw[:1] != b"d":
        return None
    offset = 1 + _HEAD_SIZE
    flags, _, _ = _DONE.unpack_from(raw, offset)
    if not flags & _ROW:
        return None
    shard, _ = _text(raw, offset + _DONE.size)
    return shard


def encode_record(result: JobResult, run_id: str | None,
                  dtype: EmbeddingDtype = "float32") -> bytes:
    """The record of a done or failed result."""
    finished_at = result.timings.finished_at or 0.0
    if result.status is Status.FAILED:
        error = result.error or ErrorInfo(code=ErrorCode.INTERNAL, message="failed")
        message = error.message.encode()[:_MAX_MESSAGE].decode(errors="ignore")
        return (b"f" + _head(run_id, finished_at, result.attempts)
                + _pack_text(error.code.value) + _pack_text(message))
    if result.status is not Status.DONE:
        raise ValueError(f"only settled results have a record, not {result.status}")
    embedding = None
    if result.embedding is not None:
        fmt = "e" if dtype == "float16" else "f"
        embedding = struct.pack(f"<{len(result.embedding)}{fmt}", *result.embedding)
    return encode_done(
        run_id=run_id, finished_at=finished_at, attempts=result.attempts,
        dim=result.embedding_dim or 0,
        shard=shard_id_of(result.output.shard) if result.output else None,
        row=result.output.row if result.output else 0, labels=result.labels,
        truncated=result.text_truncated, embedding=embedding, dtype=dtype)


def encode_done(*, run_id: str | None, finished_at: float, attempts: int, dim: int,
                shard: str | None, row: int, labels: Sequence[LabelScore] | None,
                truncated: bool, embedding: bytes | None,
                dtype: EmbeddingDtype = "float32") -> bytes:
    """A done record from its parts; `embedding`: already packed little-endian in `dtype`."""
    flags = _TRUNCATED if truncated else 0
    parts: list[bytes] = []
    if shard is not None:
        if len(shard.encode()) >= 128:  # the scripts read its length as one byte
            raise ValueError(f"a shard id is under 128 bytes: {shard[:40]!r}…")
        flags |= _ROW
        parts.append(_pack_text(shard))
    if labels is not None:
        flags |= _LABELS
        parts.append(_varint(len(labels)))
        parts += [_pack_text(item.label) for item in labels]
        parts.append(struct.pack(f"<{len(labels)}f", *(item.score for item in labels)))
    if embedding is not None:
        flags |= _F16 if dtype == "float16" else _F32
        parts.append(embedding)
    return (b"d" + _head(run_id, finished_at, attempts) + _DONE.pack(flags, dim, row)
            + b"".join(parts))


def with_row(record: bytes, row: int) -> bytes:
    """A done record with its row number set (bytes 14-15, from 1)."""
    return record[:13] + row.to_bytes(2, "little") + record[15:]


def _head(run_id: str | None, finished_at: float, attempts: int) -> bytes:
    since = max(0, int(finished_at * 1000) - TIME_ORIGIN_MS) if finished_at else 0
    return run_tag(run_id) + since.to_bytes(5, "little") + min(attempts, 255).to_bytes(1, "little")


def decode_record(job_id: str, raw: bytes | None, shard_uri: str | None) -> JobResult | None:
    """The `JobResult` a record holds. A done record is done once its shard is committed,
    which `shard_uri` (the shard's URI, or None) says; before that, the job is running. Task,
    model and source are not kept (the job id stands for them)."""
    status = record_status(raw)
    if raw is None or status is None:
        return None
    if status in (Status.QUEUED, Status.RUNNING) or (status is Status.DONE and not shard_uri):
        return JobResult(job_id=job_id, status=Status.RUNNING if status is not Status.QUEUED
                         else Status.QUEUED)
    since, attempts = int.from_bytes(raw[4:9], "little"), raw[9]
    finished_ms = since + TIME_ORIGIN_MS if since else 0
    offset = 1 + _HEAD_SIZE
    common = {"job_id": job_id, "status": status, "attempts": attempts,
              "timings": Timings(finished_at=finished_ms / 1000 if finished_ms else None)}
    if status is Status.FAILED:
        code, offset = _text(raw, offset)
        message, _ = _text(raw, offset)
        known = code if code in ErrorCode._value2member_map_ else ErrorCode.INTERNAL.value
        return JobResult.model_validate(
            common | {"error": ErrorInfo(code=ErrorCode(known), message=message)})
    flags, dim, row = _DONE.unpack_from(raw, offset)
    offset += _DONE.size
    fields: dict[str, object] = {"embedding_dim": dim or None,
                                 "text_truncated": bool(flags & _TRUNCATED)}
    if flags & _ROW:
        shard, offset = _text(raw, offset)
        fields["output"] = OutputLocation(shard=shard_uri or shard, row=row)
    if flags & _LABELS:
        count, offset = _read_varint(raw, offset)
        names = []
        for _ in range(count):
            name, offset = _text(raw, offset)
            names.append(name)
        scores = struct.unpack_from(f"<{count}f", raw, offset)
        offset += 4 * count
        fields["labels"] = [LabelScore(label=name, score=score)
                            for name, score in zip(names, scores, strict=True)]
    if flags & (_F32 | _F16):
        fmt, size = ("e", 2) if flags & _F16 else ("f", 4)
        fields["embedding"] = list(struct.unpack_from(f"<{(len(raw) - offset) // size}{fmt}",
                                                      raw, offset))
    return JobResult.model_validate(common | fields)


def _varint(number: int) -> bytes:
    out = bytearray()
    while number >= 0x80:
        out.append(number & 0x7F | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def _read_varint(raw: bytes, offset: int) -> tuple[int, int]:
    number, shift = 0, 0
    while True:
        byte = raw[offset]
        offset += 1
        number |= (byte & 0x7F) << shift
        if byte < 0x80:
            return number, offset
        shift += 7


def _pack_text(text: str) -> bytes:
    data = text.encode()
    return _varint(len(data)) + data


def _text(raw: bytes, offset: int) -> tuple[str, int]:
    length, offset = _read_varint(raw, offset)
    return raw[offset:offset + length].decode(), offset + length


def embedding_b64(embedding: list[float]) -> str:
    """An embedding for JSON: base64 of its little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(embedding)}f", *embedding)).decode()
