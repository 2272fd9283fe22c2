"""A job that does not validate: its most specific stable error code, and a short message."""

from __future__ import annotations

from pydantic import ValidationError

from schemas.errors import ErrorCode

# The validators in `schemas/jobs.py` raise errors whose pydantic `type` is an error code.
_CODES = {code.value: code for code in ErrorCode}


def validation_code(exc: ValidationError) -> ErrorCode:
    """The most specific stable code for a job that does not validate.

    The first error that names one decides: a code raised by a validator as the error's type,
    a label list over the limit, then any error under `text`; otherwise `invalid_job`.
    """
    for error in exc.errors(include_url=False):
        if error["type"] in _CODES:
            return _CODES[error["type"]]
        loc = error["loc"]
        if loc[-1:] == ("labels",) and error["type"] == "too_long":
            return ErrorCode.TOO_MANY_LABELS
        if "text" in loc:
            return ErrorCode.INVALID_TEXT
    return ErrorCode.INVALID_JOB


def validation_message(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'job'}: {e['msg']}"
             for e in exc.errors(include_url=False)]
    return "; ".join(parts)[:2000]
