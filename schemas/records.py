"""A job's record in Redis: one string per job, the only per-job key dualstream keeps.

    q                           queued (single submissions; bulk jobs have none)
    r<shard id>|<ms>            claimed: its row is being written into that shard since <ms>
    d<run tag><done fields>     done
    f<run tag><failed fields>   failed

A bulk job's record is most of what it costs Redis, so settled records are packed binary,
little-endian, and read with a few lines in any language:

    run tag      4 bytes: the first 4 bytes of SHA-256(run id), or 4 zero bytes without one;
                 the settle script (control/results.py) compares them to count a job once
    finished at  6 bytes, unsigned: Unix milliseconds
    attempts     u8 (capped at 255)
    done:   flags u8 (1 truncated text, 2 has a row, 4 has labels, 8 float32 embedding,
            16 float16 embedding), dim u16, row u32, shard id (text), labels (u16 count,
            then each as text), their scores (float32 each, best first), then the embedding
            when the job asked for it (float32 or float16, to the end)
    failed: error code (text), message (text)

A text is its UTF-8 length as a LEB128 varint (one byte below 128), then the bytes.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Mapping
from typing import Literal

from schemas.errors import ErrorCode
from schemas.results import ErrorInfo, JobResult, LabelScore, OutputLocation, Status, Timings

QUEUED = b"q"
NO_RUN = b"\0\0\0\0"
EmbeddingDtype = Literal["float32", "float16"]
_TRUNCATED, _ROW, _LABELS, _F32, _F16 = 1, 2, 4, 8, 16
_COMMON_SIZE = 7  # finished at (6 bytes, ms), attempts (1)
_DONE = struct.Struct("<BHI")  # flags, dim, row
_STATES = {ord("q"): Status.QUEUED, ord("r"): Status.RUNNING, ord("d"): Status.DONE,
           ord("f"): Status.FAILED}
_MAX_MESSAGE = 4000  # bytes of an error message a record keeps


def run_tag(run_id: str | None) -> bytes:
    return hashlib.sha256(run_id.encode()).digest()[:4] if run_id else NO_RUN


def shard_id_of(uri: str) -> str:
    """A shard's id from its vectors' URI (`…/<shard id>.npy`, schemas/keys.py ShardPaths)."""
    return uri.rsplit("/", 1)[-1].removesuffix(".npy")


def record_status(raw: bytes | None) -> Status | None:
    return _STATES.get(raw[0]) if raw else None


def record_shard(raw: bytes | None) -> str | None:
    """The shard a done record's row lives in, to resolve its URI."""
    if not raw or raw[:1] != b"d":
        return None
    offset = 5 + _COMMON_SIZE
    flags, _, _ = _DONE.unpack_from(raw, offset)
    if not flags & _ROW:
        return None
    shard, _ = _text(raw, offset + _DONE.size)
    return shard


def encode_record(result: JobResult, run_id: str | None,
                  dtype: EmbeddingDtype = "float32") -> bytes:
    """The settled record of a done or failed result."""
    finished_ms = int((result.timings.finished_at or 0) * 1000)
    head = (run_tag(run_id) + finished_ms.to_bytes(6, "little")
            + min(result.attempts, 255).to_bytes(1, "little"))
    if result.status is Status.FAILED:
        error = result.error or ErrorInfo(code=ErrorCode.INTERNAL, message="failed")
        message = error.message.encode()[:_MAX_MESSAGE].decode(errors="ignore")
        return b"f" + head + _pack_text(error.code.value) + _pack_text(message)
    if result.status is not Status.DONE:
        raise ValueError(f"only settled results have a record, not {result.status}")
    flags = _TRUNCATED if result.text_truncated else 0
    parts: list[bytes] = []
    row = 0
    if result.output is not None:
        flags |= _ROW
        row = result.output.row
        parts.append(_pack_text(shard_id_of(result.output.shard)))
    if result.labels is not None:
        flags |= _LABELS
        parts.append(struct.pack("<H", len(result.labels)))
        parts += [_pack_text(item.label) for item in result.labels]
        parts.append(struct.pack(f"<{len(result.labels)}f",
                                 *(item.score for item in result.labels)))
    if result.embedding is not None:
        flags |= _F16 if dtype == "float16" else _F32
        parts.append(struct.pack(f"<{len(result.embedding)}{'e' if dtype == 'float16' else 'f'}",
                                 *result.embedding))
    body = _DONE.pack(flags, result.embedding_dim or 0, row)
    return b"d" + head + body + b"".join(parts)


def decode_record(job_id: str, raw: bytes | None,
                  shard_uris: Mapping[str, str] | None = None) -> JobResult | None:
    """The `JobResult` a record holds; a done job's shard is its URI where `shard_uris` knows
    it, else its id. Task, model and source are not kept (the job id stands for them)."""
    status = record_status(raw)
    if raw is None or status is None:
        return None
    if status in (Status.QUEUED, Status.RUNNING):
        return JobResult(job_id=job_id, status=status)
    finished_ms, attempts = int.from_bytes(raw[5:11], "little"), raw[11]
    offset = 5 + _COMMON_SIZE
    common = {"job_id": job_id, "status": status, "attempts": attempts,
              "timings": Timings(finished_at=finished_ms / 1000 if finished_ms else None)}
    if status is Status.FAILED:
        code, offset = _text(raw, offset)
        message, _ = _text(raw, offset)
        return JobResult.model_validate(
            common | {"error": ErrorInfo(code=ErrorCode(code), message=message)})
    flags, dim, row = _DONE.unpack_from(raw, offset)
    offset += _DONE.size
    fields: dict[str, object] = {"embedding_dim": dim or None,
                                 "text_truncated": bool(flags & _TRUNCATED)}
    if flags & _ROW:
        shard, offset = _text(raw, offset)
        fields["output"] = OutputLocation(shard=(shard_uris or {}).get(shard, shard), row=row)
    if flags & _LABELS:
        (count,) = struct.unpack_from("<H", raw, offset)
        offset += 2
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


def _pack_text(text: str) -> bytes:
    data = text.encode()
    length, prefix = len(data), bytearray()
    while length >= 0x80:
        prefix.append(length & 0x7F | 0x80)
        length >>= 7
    prefix.append(length)
    return bytes(prefix) + data


def _text(raw: bytes, offset: int) -> tuple[str, int]:
    length, shift = 0, 0
    while True:
        byte = raw[offset]
        offset += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
    return raw[offset:offset + length].decode(), offset + length


def embedding_b64(embedding: list[float]) -> str:
    """An embedding for JSON: base64 of its little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(embedding)}f", *embedding)).decode()
