"""A job's record: what a settled result keeps, in how few bytes, and how it reads back."""

from __future__ import annotations

import base64
import struct

import pytest

from schemas.errors import ErrorCode
from schemas.jobs import Job, JobMessage, Task, pack_message
from schemas.records import (
    NO_RUN,
    decode_record,
    embedding_b64,
    encode_record,
    record_shard,
    record_status,
    run_tag,
)
from schemas.results import ErrorInfo, JobResult, LabelScore, OutputLocation, Status, Timings

SHARD = "s3://b/out/m-1a2b3c4d/image/mil8kq1s0a1b2c3d.npy"
SHARD_ID = "mil8kq1s0a1b2c3d"


def done(**fields: object) -> JobResult:
    base: dict[str, object] = {
        "job_id": "a" * 32, "status": Status.DONE, "task": Task.ZERO_SHOT, "model": "m",
        "source": "s3://b/x.jpg", "attempts": 1, "embedding_dim": 512,
        "labels": [LabelScore(label=name, score=s) for name, s in
                   zip(["cat", "dog", "car", "tree", "house"], [0.5, 0.25, 0.125, 0.0625,
                                                                 0.0625], strict=True)],
        "output": OutputLocation(shard=SHARD, row=17),
        "timings": Timings(finished_at=1764510000.123)}
    return JobResult.model_validate(base | fields)


def test_a_done_record_keeps_labels_scores_row_and_time_and_nothing_derivable() -> None:
    raw = encode_record(done(), "run-1")
    assert raw[:1] == b"d" and raw[1:4] == run_tag("run-1")
    back = decode_record("a" * 32, raw, SHARD)
    assert back is not None and back.status is Status.DONE
    assert back.labels == done().labels  # these scores are exact in float32
    assert back.output == OutputLocation(shard=SHARD, row=17)
    assert back.timings.finished_at == pytest.approx(1764510000.123, abs=1e-3)
    assert (back.task, back.model, back.source, back.embedding) == (None, None, None, None)
    assert back.embedding_dim == 512 and not back.text_truncated


def test_a_bulk_jobs_record_with_five_labels_is_small() -> None:
    # The value only; the key and Redis's own overhead come on top (bench/redis_cost.py).
    assert len(encode_record(done(), "run-1")) <= 76


def test_a_done_record_whose_shard_is_not_committed_reads_as_running() -> None:
    raw = encode_record(done(), None)
    assert record_shard(raw) == SHARD_ID
    assert decode_record("a" * 32, raw, None) == JobResult(job_id="a" * 32,
                                                           status=Status.RUNNING)


def test_scores_read_back_within_float32() -> None:
    labels = [LabelScore(label="x", score=0.123456789012)]
    back = decode_record("a" * 32, encode_record(done(labels=labels), None), SHARD)
    assert back is not None and back.labels is not None
    assert back.labels[0].score == pytest.approx(0.123456789012, abs=1e-7)


@pytest.mark.parametrize(("dtype", "tolerance", "size"), [("float32", 1e-7, 4),
                                                          ("float16", 1e-3, 2)])
def test_an_asked_for_embedding_is_binary_float32_or_float16(dtype: str, tolerance: float,
                                                             size: int) -> None:
    vector = [((i * 37) % 101 - 50) / 70.0 for i in range(512)]
    raw = encode_record(done(embedding=vector), None, dtype)  # type: ignore[arg-type]
    assert len(raw) == len(encode_record(done(), None)) + 512 * size
    back = decode_record("a" * 32, raw, SHARD)
    assert back is not None and back.embedding == pytest.approx(vector, abs=tolerance)


def test_a_failed_record_keeps_its_code_and_message() -> None:
    failed = JobResult(job_id="b" * 32, status=Status.FAILED, attempts=3,
                       error=ErrorInfo(code=ErrorCode.CORRUPT_IMAGE, message="bad\nbytes ünï"))
    raw = encode_record(failed, None)
    assert raw[:4] == b"f" + NO_RUN
    back = decode_record("b" * 32, raw, None)
    assert back is not None and back.status is Status.FAILED and back.attempts == 3
    assert back.error == ErrorInfo(code=ErrorCode.CORRUPT_IMAGE, message="bad\nbytes ünï")


def test_a_truncated_text_is_kept() -> None:
    back = decode_record("a" * 32, encode_record(done(labels=None, text_truncated=True), None),
                         SHARD)
    assert back is not None and back.text_truncated and back.labels is None


def test_a_queued_record_reads_as_queued() -> None:
    assert record_status(b"q") is Status.QUEUED and record_status(None) is None
    assert decode_record("c" * 32, b"q", None) == JobResult(job_id="c" * 32,
                                                           status=Status.QUEUED)


def test_only_settled_results_have_a_record() -> None:
    with pytest.raises(ValueError, match="settled"):
        encode_record(JobResult(job_id="d" * 32, status=Status.QUEUED), None)


def test_embeddings_in_json_are_base64_of_little_endian_float32() -> None:
    assert struct.unpack("<2f", base64.b64decode(embedding_b64([0.5, -2.0]))) == (0.5, -2.0)


def test_a_packed_message_carries_shared_fields_once_and_reads_back_the_same_jobs() -> None:
    jobs = [Job(task=Task.ZERO_SHOT, model="m", image=f"s3://b/{i}.jpg", return_embedding=False,
                zero_shot={"labels": ["cat", "dog"], "top_k": 2}) for i in range(3)]
    packed = pack_message(jobs, "run-1")
    assert packed["jobs"] == [{"image": f"s3://b/{i}.jpg"} for i in range(3)]
    assert packed["shared"]["zero_shot"]["labels"] == ["cat", "dog"]
    message = JobMessage.model_validate(packed)
    assert message.jobs == jobs and message.run_id == "run-1"
    assert [job.job_id for job in message.jobs] == [job.job_id for job in jobs]


def test_a_packed_message_of_one_job_is_the_job_itself() -> None:
    job = Job(task=Task.TEXT_EMBEDDING, model="m", text="hello")
    packed = pack_message([job])
    assert "shared" not in packed and JobMessage.model_validate(packed).jobs == [job]
