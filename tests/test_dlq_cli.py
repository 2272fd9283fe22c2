"""`dualstream dlq list --json` and `dlq replay --all` against a real Redis."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from control.deadletters import DeadLetterStore
from producer.cli import dlq
from schemas.errors import ErrorCode
from schemas.jobs import Job, Task
from schemas.keys import RedisKeys, queue_name
from tests.fixtures.faults import message_jobs

MODEL = "openclip:local-dir:/models/tiny"


def job(text: str) -> dict[str, Any]:
    return Job(task=Task.TEXT_EMBEDDING, text=text, model=MODEL).model_dump(mode="json")


@pytest.fixture
def letters(redis_url: str) -> dict[str, Any]:
    store = DeadLetterStore(redis.Redis.from_url(redis_url), RedisKeys())
    common = {"error": "boom", "message_id": None, "deliveries": 1, "queue": queue_name(MODEL)}
    return {
        "message": store.add(payload={"jobs": [job("a"), job("b")]},
                             code=ErrorCode.POISON_MESSAGE, **common),
        "single_job": store.add(payload=job("c"), code=ErrorCode.INTERNAL, **common),
        "invalid": store.add(payload={"jobs": []}, code=ErrorCode.INVALID_JOB, **common),
        "undecoded": store.add(payload=None, code=ErrorCode.INVALID_JOB, raw_body=b"\x80pickle",
                               content_type="application/x-python-serialize", **common),
        "store": store,
    }


def run(redis_url: str, *args: str) -> Any:
    return CliRunner().invoke(dlq, list(args), env={"DUALSTREAM_REDIS_URL": redis_url},
                              catch_exceptions=False)


def test_list_json_gives_one_parseable_object_per_letter(redis_url: str,
                                                         letters: dict[str, Any]) -> None:
    result = run(redis_url, "list", "--json")
    assert result.exit_code == 0, result.output
    listed = [json.loads(line) for line in result.output.splitlines()]
    assert {item["id"] for item in listed} == {
        letters[name].id for name in ("message", "single_job", "invalid", "undecoded")}
    undecoded = next(item for item in listed if item["id"] == letters["undecoded"].id)
    assert base64.b64decode(undecoded["raw_body"]) == b"\x80pickle"


def test_replay_all_sends_every_replayable_letter_and_names_the_rest(
    redis_url: str, letters: dict[str, Any]
) -> None:
    result = run(redis_url, "replay", "--all")
    assert result.exit_code == 0, result.output
    assert f"replayed {letters['message'].id}: 2 jobs" in result.output
    assert f"replayed {letters['single_job'].id}: 1 jobs" in result.output
    assert f"skipped {letters['invalid'].id}" in result.output
    left = {letter.id for letter in letters["store"].list()}
    assert left == {letters["invalid"].id, letters["undecoded"].id}
    queued = redis.Redis.from_url(redis_url).lrange(queue_name(MODEL), 0, -1)
    texts = sorted(sent["text"] for raw in queued for sent in _jobs(raw))
    assert texts == ["a", "b", "c"]


def test_a_named_letter_that_cannot_be_replayed_fails_the_command(
    redis_url: str, letters: dict[str, Any]
) -> None:
    result = CliRunner().invoke(dlq, ["replay", letters["message"].id, letters["invalid"].id],
                                env={"DUALSTREAM_REDIS_URL": redis_url})
    assert result.exit_code != 0 and "not a valid job message" in result.output
    assert len(letters["store"].list()) == 4  # all or none


def _jobs(raw: bytes) -> list[dict[str, Any]]:
    return message_jobs(raw)
