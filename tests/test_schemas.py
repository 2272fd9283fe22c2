"""The wire contract: validation at the edge, stable job ids, JSON Schema export."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, get_args

import pytest
from pydantic import ValidationError
from pydantic_core.core_schema import ErrorType

from schemas.errors import ErrorCode
from schemas.jobs import (
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_TEXT_CHARS,
    Job,
    JobMessage,
    Task,
    ZeroShotOptions,
)
from schemas.keys import model_slug, queue_name
from worker.validation import validation_code, validation_message

MODEL = "kakaobrain/align-base"
TEXT: dict[str, Any] = {"task": "text_embedding", "model": MODEL}
ZERO_SHOT: dict[str, Any] = {"task": "zero_shot", "model": MODEL, "image": "s3://b/k.jpg"}


def zero_shot_job(**overrides: object) -> Job:
    fields: dict[str, object] = {"task": Task.ZERO_SHOT, "model": MODEL, "image": "s3://b/k.jpg",
                                 "zero_shot": ZeroShotOptions(labels=["cat", "dog"])}
    fields.update(overrides)
    return Job(**fields)  # type: ignore[arg-type]


def test_same_input_model_and_options_give_the_same_job_id() -> None:
    assert zero_shot_job().job_id == zero_shot_job().job_id
    round_tripped = Job.model_validate_json(zero_shot_job().model_dump_json())
    assert zero_shot_job().job_id == round_tripped.job_id


def test_any_change_of_input_model_or_options_changes_the_job_id() -> None:
    base = zero_shot_job().job_id
    assert zero_shot_job(image="s3://b/other.jpg").job_id != base
    assert zero_shot_job(model="BAAI/AltCLIP").job_id != base
    assert zero_shot_job(zero_shot=ZeroShotOptions(labels=["cat", "dog"], top_k=1)).job_id != base
    assert zero_shot_job(etag="abc").job_id != base
    assert zero_shot_job(version="3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrH").job_id != base


def test_return_embedding_does_not_change_the_job_id() -> None:
    assert zero_shot_job(return_embedding=False).job_id == zero_shot_job().job_id


@pytest.mark.parametrize("labels, fragment", [([], "at least one candidate label"),
                                              (["cat", " "], "must not be blank"),
                                              (["a"] * 2, "unique"),
                                              ([f"l{i}" for i in range(10_000)], "at most")])
def test_bad_label_lists_are_rejected_with_a_reason(labels: list[str], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        ZeroShotOptions(labels=labels)


@pytest.mark.parametrize("job, code", [
    ({**ZERO_SHOT, "zero_shot": {"labels": []}}, ErrorCode.EMPTY_LABELS),
    ({**ZERO_SHOT, "zero_shot": {"labels": ["cat", " "]}}, ErrorCode.EMPTY_LABELS),
    ({**TEXT, "text": ""}, ErrorCode.EMPTY_TEXT),
    ({**TEXT, "text": " \n\t "}, ErrorCode.EMPTY_TEXT),
], ids=["empty_labels", "blank_label", "empty_text", "blank_text"])
def test_a_validator_raises_a_typed_error_whose_type_is_the_code(job: dict[str, Any],
                                                                  code: ErrorCode) -> None:
    with pytest.raises(ValidationError) as caught:
        Job.model_validate(job)
    [error] = caught.value.errors(include_url=False)
    assert error["type"] == code.value
    assert code.value not in error["msg"] and "Value error" not in error["msg"]


@pytest.mark.parametrize("job, code", [
    ({**ZERO_SHOT, "zero_shot": {"labels": []}}, ErrorCode.EMPTY_LABELS),
    ({**ZERO_SHOT, "zero_shot": {"labels": ["cat", " "]}}, ErrorCode.EMPTY_LABELS),
    ({**TEXT, "text": ""}, ErrorCode.EMPTY_TEXT),
    ({**TEXT, "text": " \n\t "}, ErrorCode.EMPTY_TEXT),
    ({**ZERO_SHOT, "zero_shot": {"labels": [f"l{i}" for i in range(MAX_LABELS + 1)]}},
     ErrorCode.TOO_MANY_LABELS),
    ({**TEXT, "text": "x" * (MAX_TEXT_CHARS + 1)}, ErrorCode.INVALID_TEXT),
    ({**TEXT, "text": "caf\udce9"}, ErrorCode.INVALID_TEXT),
    ({**TEXT, "text": 42}, ErrorCode.INVALID_TEXT),
    ({**ZERO_SHOT, "zero_shot": {"labels": ["cat", "cat"]}}, ErrorCode.INVALID_JOB),
    ({**TEXT, "text": "a", "image": "s3://b/k.jpg"}, ErrorCode.INVALID_JOB),
    ({**TEXT, "text": "a", "priority": 9}, ErrorCode.INVALID_JOB),
    ({"model": MODEL, "image": "s3://b/k.jpg"}, ErrorCode.INVALID_JOB),
], ids=["empty_labels", "blank_label", "empty_text", "blank_text", "too_many_labels",
        "text_too_long", "text_lone_surrogate", "text_not_a_string", "duplicate_labels",
        "image_and_text", "unknown_field", "missing_task"])
def test_a_job_that_does_not_validate_gets_its_most_specific_code(job: dict[str, Any],
                                                                  code: ErrorCode) -> None:
    with pytest.raises(ValidationError) as caught:
        JobMessage.model_validate({"jobs": [job]})  # as the worker parses each job
    assert validation_code(caught.value) is code


def test_the_rejection_message_names_where_and_what_without_the_code() -> None:
    with pytest.raises(ValidationError) as caught:
        JobMessage.model_validate({"jobs": [{**ZERO_SHOT, "zero_shot": {"labels": []}}]})
    assert validation_message(caught.value) == (
        "jobs.0.zero_shot.labels: at least one candidate label is required")


def test_error_codes_are_never_pydantic_error_types() -> None:
    """A validation error's type is read as a code, so no built-in type may look like one."""
    assert not {code.value for code in ErrorCode} & set(get_args(ErrorType))


def test_templates_need_exactly_one_slot() -> None:
    with pytest.raises(ValidationError, match="slot"):
        ZeroShotOptions(labels=["cat"], templates=["a photo"])


@pytest.mark.parametrize("fields", [
    {"task": "text_embedding", "text": "  "},
    {"task": "text_embedding", "image": "s3://b/k"},
    {"task": "image_embedding", "text": "hello"},
    {"task": "zero_shot", "image": "s3://b/k"},
    {"task": "image_embedding", "image": "s3://b/k", "unknown": 1},
    {"task": "text_embedding", "text": "x" * 20_001},
    {"task": "text_embedding", "text": "bad \udc80 surrogate"},
    {"task": "nonsense", "image": "s3://b/k"},
])
def test_malformed_jobs_are_rejected(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Job.model_validate({"model": MODEL, **fields})


def test_a_message_carries_jobs_for_one_model() -> None:
    with pytest.raises(ValidationError, match="one model"):
        JobMessage(jobs=[zero_shot_job(), zero_shot_job(model="BAAI/AltCLIP")])


def test_queue_names_are_safe_and_distinct_per_model() -> None:
    assert queue_name(MODEL) != queue_name("BAAI/AltCLIP")
    assert all(c.isalnum() or c in ".-_" for c in queue_name("/tmp/some dir/model"))
    assert model_slug("/a/b/tiny") != model_slug("/c/b/tiny")


def test_schemas_and_producer_never_import_torch() -> None:
    code = ("import sys, schemas.jobs, schemas.results, schemas.settings, producer.cli, "
            "producer.client, producer.bulk; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_json_schema_export_covers_jobs_and_results() -> None:
    out = subprocess.run([sys.executable, "-m", "dualstream.cli", "schema"], check=True,
                         capture_output=True, text=True).stdout
    assert '"job_result"' in out and '"zero_shot"' in out


def test_a_jobs_id_is_computed_once_and_a_changed_copy_gets_its_own() -> None:
    job = Job(task=Task.TEXT_EMBEDDING, text="a cat", model="m")
    first = job.job_id
    assert job.__dict__["job_id"] == first and job.job_id is first
    changed = job.model_copy(update={"text": "a dog"})
    assert changed.job_id != first
    assert changed.job_id == Job(task=Task.TEXT_EMBEDDING, text="a dog", model="m").job_id
    assert job == Job(task=Task.TEXT_EMBEDDING, text="a cat", model="m"), "equality is by fields"


def test_a_label_over_the_length_limit_makes_an_invalid_job() -> None:
    from worker.validation import validation_code

    with pytest.raises(ValidationError) as raised:
        ZeroShotOptions(labels=["cat", "x" * (MAX_LABEL_CHARS + 1)])
    assert validation_code(raised.value) is ErrorCode.INVALID_JOB
    assert ZeroShotOptions(labels=["x" * MAX_LABEL_CHARS]).labels  # at the limit: fine


@pytest.mark.parametrize("run_id", ["run:1", "run 1", "run/1", "", "r" * 129])
def test_a_run_id_is_letters_digits_dots_underscores_and_dashes(run_id: str) -> None:
    job = Job(task=Task.TEXT_EMBEDDING, model="m", text="hello")
    with pytest.raises(ValidationError):
        JobMessage(jobs=[job], run_id=run_id)
    assert JobMessage(jobs=[job], run_id="run-1.a_b").run_id == "run-1.a_b"


@pytest.mark.parametrize("spellings", [
    ["kakaobrain/align-base", "align:kakaobrain/align-base", "kakaobrain/align-base/",
     " align: kakaobrain/align-base "],
    ["laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
     "openclip:hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K"],
    ["/models/tiny", "/models/tiny/", "local-dir:/models/tiny",
     "openclip:local-dir:/models//tiny/"],
])
def test_equivalent_model_spellings_share_a_queue_and_a_job_id(spellings: list[str]) -> None:
    assert len({queue_name(spec) for spec in spellings}) == 1
    jobs = [Job(task=Task.TEXT_EMBEDDING, text="t", model=spec) for spec in spellings]
    assert len({job.job_id for job in jobs}) == 1 and len({job.model for job in jobs}) == 1


def test_different_models_keep_different_queues() -> None:
    specs = ["kakaobrain/align-base", "BAAI/AltCLIP", "ViT-B-16", "/models/a", "/models/b"]
    assert len({queue_name(spec) for spec in specs}) == len(specs)
