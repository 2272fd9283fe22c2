"""docs/api.md is the API's own OpenAPI document, as `python -m producer.api_docs` renders it."""

from __future__ import annotations

from producer.api_docs import current
from tests.fixtures.services import REPO


def test_docs_api_md_is_current() -> None:
    assert (REPO / "docs" / "api.md").read_text() == current(), (
        "regenerate it: python -m producer.api_docs > docs/api.md")
