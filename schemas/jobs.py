"""Jobs: what producers put on the queue.

A job is validated here, at the edge, before it is ever enqueued; the worker validates it again on
receipt. Jobs are JSON only. The job id is derived from the job's content, so the same input,
model and options always give the same id.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.errors import ErrorCode, invalid_job_error
from schemas.keys import canonical_model

SCHEMA_VERSION: Literal[1] = 1
DEFAULT_TEMPLATE = "This is a photo of {}."
MAX_TEXT_CHARS = 20_000
MAX_LABELS = 1_000
MAX_LABEL_CHARS = 1_000
MAX_RUN_ID = 128
RUN_ID = re.compile(r"^[A-Za-z0-9._-]+$")
MAX_JOBS_PER_MESSAGE = 256

TemplateSetName = Literal["default", "openai_imagenet", "simple_imagenet"]


class Task(StrEnum):
    IMAGE_EMBEDDING = "image_embedding"
    TEXT_EMBEDDING = "text_embedding"
    ZERO_SHOT = "zero_shot"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ZeroShotOptions(_Frozen):
    """Candidate labels scored against an image.

    `templates` is either a list of prompt templates with one `{}` each, or the name of a
    prompt ensemble (`openai_imagenet`: open_clip's 80 ImageNet templates; `simple_imagenet`: 7).
    Scores are a softmax over the labels; with `multi_label` each label is scored on its own
    (see README, "Zero-shot scores").
    """

    labels: Annotated[list[str], Field(max_length=MAX_LABELS)]
    templates: list[str] | TemplateSetName = "default"
    top_k: Annotated[int, Field(ge=1)] = 5
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    multi_label: bool = False

    @field_validator("labels")
    @classmethod
    def _labels_present(cls, labels: list[str]) -> list[str]:
        if not labels:
            raise invalid_job_error(ErrorCode.EMPTY_LABELS,
                                    "at least one candidate label is required")
        if any(not label.strip() for label in labels):
            raise invalid_job_error(ErrorCode.EMPTY_LABELS, "labels must not be blank")
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be unique")
        if any(len(label) > MAX_LABEL_CHARS for label in labels):
            raise ValueError(f"a label is at most {MAX_LABEL_CHARS} characters")
        return labels

    @field_validator("templates")
    @classmethod
    def _templates_have_slot(cls, templates: list[str] | str) -> list[str] | str:
        if isinstance(templates, list):
            if not templates:
                raise ValueError("at least one template is required")
            bad = [t for t in templates if t.count("{}") != 1]
            if bad:
                raise ValueError(f"each template needs exactly one '{{}}' slot: {bad[:3]}")
        return templates


class Job(_Frozen):
    """One unit of work: one image or one text through one model."""

    schema_version: Literal[1] = SCHEMA_VERSION
    task: Task
    model: Annotated[str, Field(min_length=1, max_length=512)]
    image: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    text: Annotated[str, Field(max_length=MAX_TEXT_CHARS)] | None = None
    zero_shot: ZeroShotOptions | None = None
    return_embedding: bool = True
    # How an asked-for embedding is kept in Redis (the row in object storage is float32).
    embedding_dtype: Literal["float32", "float16"] = "float32"
    etag: str | None = None
    # An S3 object version (`VersionId`): read exactly that version, not the latest.
    version: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    idempotency_key: Annotated[str, Field(max_length=256)] | None = None

    @field_validator("model")
    @classmethod
    def _one_spelling(cls, model: str) -> str:
        """Equivalent spellings of a model are one model: one queue, one job id."""
        return canonical_model(model)

    @model_validator(mode="after")
    def _inputs_match_task(self) -> Job:
        if self.task is Task.TEXT_EMBEDDING:
            if self.text is None or self.image is not None:
                raise ValueError("a text_embedding job takes `text` and no `image`")
            if not self.text.strip():
                raise invalid_job_error(ErrorCode.EMPTY_TEXT, "text must not be empty or blank")
        else:
            if self.image is None or self.text is not None:
                raise ValueError(f"a {self.task} job takes `image` and no `text`")
        if (self.task is Task.ZERO_SHOT) != (self.zero_shot is not None):
            raise ValueError("`zero_shot` options are required for, and only for, zero_shot jobs")
        return self

    @cached_property
    def job_id(self) -> str:
        """Stable id: a hash of the canonical JSON of everything that defines the result.

        Computed once per job (the worker asks for it several times per job); `model_copy`
        below forgets it, since a copy with updates is another job."""
        fields = self.model_dump(mode="json", exclude={"return_embedding", "embedding_dtype"})
        if fields["version"] is None:
            del fields["version"]  # an unversioned job keeps the id it had before versions
        canonical = json.dumps(
            fields,
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def model_copy(self, *, update: Mapping[str, Any] | None = None,
                   deep: bool = False) -> Job:
        copy = super().model_copy(update=update, deep=deep)
        copy.__dict__.pop("job_id", None)
        return copy

    @property
    def source(self) -> str:
        """What the job reads, for logs and output metadata."""
        return self.image if self.image is not None else "text:" + (self.text or "")[:64]


class JobMessage(_Frozen):
    """What travels on the queue: one or more jobs for the same model.

    Bulk producers pack several jobs into one message; the worker batches across messages
    either way. On the wire, fields every job shares may travel once, in `shared`: each job is
    `{**shared, **job}`, so a queued bulk job costs little more than its source.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    jobs: Annotated[list[Job], Field(min_length=1, max_length=MAX_JOBS_PER_MESSAGE)]
    # Letters, digits, `.`, `_`, `-`: a run id names Redis keys (`ds:run:<id>`).
    run_id: Annotated[str, Field(min_length=1, max_length=MAX_RUN_ID,
                                 pattern=RUN_ID.pattern)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unshare(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("shared"), dict):
            shared = data["shared"]
            jobs = data.get("jobs")
            data = {k: v for k, v in data.items() if k != "shared"}
            if isinstance(jobs, list):
                data["jobs"] = [{**shared, **job} if isinstance(job, dict) else job
                                for job in jobs]
        return data

    @model_validator(mode="after")
    def _one_model(self) -> JobMessage:
        models = {job.model for job in self.jobs}
        if len(models) != 1:
            raise ValueError(f"a message carries jobs for one model, got {sorted(models)}")
        return self


def pack_message(jobs: Sequence[Job], run_id: str | None = None) -> dict[str, Any]:
    """A `JobMessage` as it goes on the queue: fields every job shares travel once."""
    dumped = [job.model_dump(mode="json", exclude_defaults=True) for job in jobs]
    shared = dict(dumped[0]) if len(dumped) > 1 else {}
    for fields in dumped[1:]:
        shared = {k: v for k, v in shared.items() if k in fields and fields[k] == v}
    message: dict[str, Any] = {"schema_version": SCHEMA_VERSION,
                               "jobs": [{k: v for k, v in fields.items() if k not in shared}
                                        for fields in dumped]}
    if shared:
        message["shared"] = shared
    if run_id:
        message["run_id"] = run_id
    return message
