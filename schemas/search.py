"""Search over HTTP (`POST /v1/search`): the request, its answer, and the codes of the ways it
can fail. The query is embedded by a worker, as an ordinary job; the nearest rows are found in
an export (`dualstream export`) or in a run's committed rows."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from schemas.errors import ErrorCode, invalid_job_error
from schemas.jobs import MAX_RUN_ID, MAX_TEXT_CHARS, RUN_ID
from schemas.keys import canonical_model

MAX_K = 1000


class SearchCode(StrEnum):
    """Why a search was refused; a query job that failed carries its own `ErrorCode`."""

    NOT_AVAILABLE = "search_not_available"  # the API was installed without numpy and pyarrow
    NO_MODEL = "search_no_model"  # no `model`, and the API has no DUALSTREAM_MODEL
    SET_NOT_FOUND = "search_set_not_found"  # no such export, or no rows in it or in the run
    SET_NOT_ALLOWED = "search_set_not_allowed"  # outside DUALSTREAM_SEARCH_ROOTS
    SET_UNREADABLE = "search_set_unreadable"  # what is there is not an export
    STORAGE_UNAVAILABLE = "search_storage_unavailable"  # object storage failed; try again
    WRONG_DIMENSION = "search_wrong_dimension"  # the model's vectors are not the set's size
    QUERY_TIMEOUT = "search_query_timeout"  # no worker finished the query job in time


class SearchError(Exception):
    """A search that cannot be answered, with its code."""

    def __init__(self, code: SearchCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SearchRequest(BaseModel):
    """Exactly one of `export` and `run` (what is searched), exactly one of `text` and `image`
    (the query: a text, or an image source the workers can read, `s3://…` or a local path)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    export: Annotated[str, Field(
        min_length=1, max_length=2048, description="what `dualstream export` wrote: a folder "
        "the API can read, or s3://bucket/prefix")] | None = None
    run: Annotated[str, Field(
        min_length=1, max_length=MAX_RUN_ID, pattern=RUN_ID.pattern,
        description="a run id: its committed rows of `model`")] | None = None
    text: Annotated[str, Field(
        max_length=MAX_TEXT_CHARS, description="find the images nearest this text (any "
        "language the model reads: Chinese with AltCLIP)")] | None = None
    image: Annotated[str, Field(
        min_length=1, max_length=2048, description="find the images nearest this image: "
        "s3://bucket/key or a local path, read by a worker")] | None = None
    model: Annotated[str, Field(
        min_length=1, max_length=512, description="the model that made the rows (default: "
        "the API's DUALSTREAM_MODEL)")] | None = None
    k: Annotated[int, Field(ge=1, le=MAX_K, description="how many hits")] = 10
    modality: Literal["image"] = Field(default="image", description="what the searched "
                                       "rows are: images")

    @field_validator("model")
    @classmethod
    def _one_spelling(cls, model: str | None) -> str | None:
        return canonical_model(model) if model is not None else None

    @field_validator("text")
    @classmethod
    def _not_blank(cls, text: str | None) -> str | None:
        if text is not None and not text.strip():
            raise invalid_job_error(ErrorCode.EMPTY_TEXT, "text must not be empty or blank")
        return text

    @model_validator(mode="after")
    def _one_of_each(self) -> SearchRequest:
        if (self.export is None) == (self.run is None):
            raise PydanticCustomError("search_set", "give exactly one of `export` and `run`")
        if (self.text is None) == (self.image is None):
            raise PydanticCustomError("search_query", "give exactly one of `text` and `image`")
        return self


class SearchHit(BaseModel):
    score: float = Field(description="cosine similarity")
    job_id: str
    source: str


class SearchResults(BaseModel):
    query_job_id: str = Field(description="the job that embedded the query (GET "
                              "/v1/jobs/{job_id})")
    model: str
    rows: int = Field(description="how many rows were searched")
    hits: list[SearchHit] = Field(description="best first")


class SearchProblem(BaseModel):
    """Why a search failed: a `SearchCode`, or the query job's own error code."""

    code: str
    message: str
    job_id: str | None = None


class SearchFailure(BaseModel):
    detail: SearchProblem
