"""The README's "Error codes" table lists every `ErrorCode`, each on its own line."""

from __future__ import annotations

from pathlib import Path

from schemas.errors import ErrorCode

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_lists_every_error_code_once() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("### Error codes", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    listed = [row.split("`")[1] for row in rows]
    assert sorted(listed) == sorted(code.value for code in ErrorCode)
