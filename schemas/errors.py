"""One error tree for the whole system.

Every failure a job can meet has a stable `ErrorCode`. Errors are either permanent (the job fails
at once and lands in the dead-letter store) or transient (retried with backoff). A job that does
not validate carries its code as the `type` of a pydantic error (`invalid_job_error`).
"""

from __future__ import annotations

from enum import StrEnum

from pydantic_core import PydanticCustomError


class ErrorCode(StrEnum):
    # The job itself
    INVALID_JOB = "invalid_job"
    UNKNOWN_MODEL = "unknown_model"
    WRONG_MODEL = "wrong_model"
    EMPTY_LABELS = "empty_labels"
    TOO_MANY_LABELS = "too_many_labels"
    EMPTY_TEXT = "empty_text"
    INVALID_TEXT = "invalid_text"
    # The source
    SOURCE_NOT_ALLOWED = "source_not_allowed"
    SOURCE_NOT_FOUND = "source_not_found"
    ACCESS_DENIED = "access_denied"
    SOURCE_TOO_LARGE = "source_too_large"
    EMPTY_SOURCE = "empty_source"
    SOURCE_CHANGED = "source_changed"  # not the version or ETag the job names
    # The image
    UNSUPPORTED_FORMAT = "unsupported_image_format"
    CORRUPT_IMAGE = "corrupt_image"
    IMAGE_TOO_LARGE = "image_too_large"
    NOT_AN_IMAGE = "not_an_image"  # no image format's signature: text, HTML, random bytes
    TRUNCATED_IMAGE = "truncated_image"  # a known format whose data ends early
    BAD_GEOMETRY = "bad_geometry"  # an aspect ratio no model input can be made from
    # The system
    TRANSIENT_STORAGE = "transient_storage_error"
    TRANSIENT_BROKER = "transient_broker_error"
    JOB_BUSY = "job_busy"
    POISON_MESSAGE = "poison_message"
    INTERNAL = "internal_error"


class DualstreamError(Exception):
    """Base of every error dualstream raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class PermanentError(DualstreamError):
    """Fails the job at once; retrying cannot help."""


class TransientError(DualstreamError):
    """Retried with jittered backoff; the job is not failed while retries remain."""

    code = ErrorCode.TRANSIENT_STORAGE


class InvalidJob(PermanentError):
    code = ErrorCode.INVALID_JOB


class ModelSpecError(PermanentError):
    code = ErrorCode.UNKNOWN_MODEL


class SourceError(PermanentError):
    code = ErrorCode.SOURCE_NOT_FOUND


class ImageError(PermanentError):
    code = ErrorCode.CORRUPT_IMAGE


class TextError(PermanentError):
    code = ErrorCode.INVALID_TEXT


class JobBusy(TransientError):
    """Another worker holds a live claim on this job; try again once its lease ends."""

    code = ErrorCode.JOB_BUSY

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def invalid_job_error(code: ErrorCode, message: str) -> PydanticCustomError:
    """What a validator raises for a job that fails with a specific code: the error's `type` is
    `code`, its message is `message` as written (`worker/validation.py` reads the code back)."""
    return PydanticCustomError(code.value, message)
