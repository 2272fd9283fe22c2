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


def test_the_store_is_capped_by_entries_and_bytes_and_counts_what_it_trims(
    redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    common = {"code": ErrorCode.INVALID_JOB, "message_id": None, "deliveries": 1, "queue": "q"}
    store = DeadLetterStore(client, RedisKeys(), max_entries=3, max_bytes=4096)
    added = [store.add(payload={"n": n}, error=f"bad {n}", **common) for n in range(5)]
    assert [letter.id for letter in store.list()] == [letter.id for letter in added[2:]]
    assert store.trimmed() == 2

    # About 3,900 bytes: one 200-byte letter fits beside it, two do not (and three are too many).
    big = store.add(payload="x" * 3700, error="big", **common)
    assert [letter.id for letter in store.list()] == [added[4].id, big.id]
    assert store.trimmed() == 4
    assert store.remove(big.id) and not store.remove(big.id)
    store.add(payload="y" * 3700, error="big", **common)  # fits once `big` is gone
    assert store.trimmed() == 4 and len(store.list()) == 2

    assert store.purge() == 2 and store.list() == [] and store.trimmed() == 4
    assert int(client.hget("ds:dlq:stats", "bytes") or 0) == 0


def test_a_letter_added_again_under_its_id_counts_once(redis_url: str) -> None:
    store = DeadLetterStore(redis.Redis.from_url(redis_url), RedisKeys(), max_entries=2)
    common = {"code": ErrorCode.INVALID_JOB, "message_id": "m", "deliveries": 1, "queue": "q"}
    for _ in range(5):
        store.add(payload={"a": 1}, error="again", dedupe_key="m|0", **common)
    store.add(payload={"b": 2}, error="other", **common)
    assert len(store.list()) == 2 and store.trimmed() == 0
