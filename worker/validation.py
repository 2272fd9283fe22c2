"""A job that does not validate: its most specific stable error code, and a short message."""

from __future__ import annotations

from pydantic import ValidationError

from schemas.errors import ErrorCode

_CODE_MARKERS = {"empty_text:": ErrorCode.EMPTY_TEXT, "empty_labels:": ErrorCode.EMPTY_LABELS}


def validation_code(exc: ValidationError) -> ErrorCode:
    """The most specific stable code for a job that does not validate."""
    for error in exc.errors(include_url=False):
        for marker, code in _CODE_MARKERS.items():
            if marker in error["msg"]:
                return code
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
