"""The in-flight protocol on a real redis-server: a fetched message is held by its consumer
from the same command that took it; ack, requeue and the sweep of dead consumers each move it
in one step; a live consumer is never swept."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection

from control.deadletters import DeadLetterStore
from control.inflight import InflightLedger
from control.transport import InflightTransport
from schemas.errors import ErrorCode
from schemas.keys import RedisKeys
from tests.fixtures.faults import owned_redis

_ = owned_redis  # a fixture

QUEUE = "dualstream.test-queue"
KEYS = RedisKeys("ds")
TTL_S = 1.0


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def connection(redis_url: str) -> Iterator[Connection]:
    with Connection(redis_url, transport=InflightTransport, transport_options={
            "heartbeat_interval_s": 0.2, "heartbeat_ttl_s": TTL_S}) as conn:
        yield conn


def publish(connection: Connection, body: dict[str, Any]) -> None:
    with connection.Producer() as producer:
        producer.publish(body, routing_key=QUEUE, serializer="json",
                         headers={"id": body["id"]}, declare=[connection.SimpleQueue(QUEUE).queue])


def sweep_for(ledger: InflightLedger, seconds: float) -> int:
    """Sweep every 0.2 s for `seconds`, as live consumers do; messages moved in all."""
    moved, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        moved += ledger.sweep()
        time.sleep(0.2)
    return moved


def sweep_until_moved(ledger: InflightLedger, timeout: float = 30) -> int:
    """Sweep every 0.2 s, as live consumers do, until a sweep moves something (a dead
    consumer's messages go back in one sweep), then once more; messages moved in all. A slow
    machine only delays that sweep, so the deadline is generous."""
    deadline = time.monotonic() + timeout
    while (moved := ledger.sweep()) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    return moved + ledger.sweep()


def held_lists(client: redis.Redis) -> dict[str, list[bytes]]:
    keys = [key.decode() for key in client.zrange(KEYS.consumers, 0, -1)]
    return {key: client.lrange(key, 0, -1) for key in keys if client.llen(key)}


def test_a_fetched_message_is_held_by_its_consumer_and_gone_after_the_ack(
        connection: Connection, client: redis.Redis) -> None:
    publish(connection, {"id": "m1"})
    queue = connection.SimpleQueue(QUEUE)
    message = queue.get(timeout=2)
    assert message.payload == {"id": "m1"}
    assert client.llen(QUEUE) == 0
    [(inflight, [raw])] = held_lists(client).items()
    assert inflight.endswith(f"|{QUEUE}") and json.loads(raw)["headers"]["id"] == "m1"
    message.ack()
    assert held_lists(client) == {} and client.llen(QUEUE) == 0
    queue.close()


def test_a_rejected_message_goes_back_on_its_queue_once(connection: Connection,
                                                       client: redis.Redis) -> None:
    publish(connection, {"id": "m2"})
    queue = connection.SimpleQueue(QUEUE)
    message = queue.get(timeout=2)
    message.requeue()
    assert held_lists(client) == {} and client.llen(QUEUE) == 1
    again = queue.get(timeout=2)
    assert again.payload == {"id": "m2"}
    again.ack()
    queue.close()


def test_a_consumer_that_stops_beating_has_its_messages_swept_back_and_counted_as_lost(
        connection: Connection, client: redis.Redis) -> None:
    publish(connection, {"id": "m3"})
    queue = connection.SimpleQueue(QUEUE)
    queue.get(timeout=2)
    channel = queue.channel
    channel._heartbeat.stop()  # as a SIGKILL would: the list stays, the beats stop
    ledger = InflightLedger(client, KEYS, heartbeat_ttl_s=TTL_S)
    assert ledger.held(QUEUE) == 1
    assert ledger.sweep() == 0, "not dead yet"
    assert sweep_until_moved(ledger) == 1
    assert client.llen(QUEUE) == 1 and held_lists(client) == {}
    assert client.hget(KEYS.deliveries("m3"), "lost") == b"1"
    assert ledger.held(QUEUE) == 0


def test_a_live_consumer_is_never_swept(connection: Connection, client: redis.Redis) -> None:
    publish(connection, {"id": "m4"})
    queue = connection.SimpleQueue(QUEUE)
    message = queue.get(timeout=2)
    ledger = InflightLedger(client, KEYS, heartbeat_ttl_s=TTL_S)
    deadline = time.monotonic() + 3 * TTL_S
    while time.monotonic() < deadline:
        assert ledger.sweep() == 0
        time.sleep(0.1)
    assert ledger.held(QUEUE) == 1
    message.ack()
    queue.close()


def test_closing_a_channel_puts_back_what_it_never_acknowledged(
        connection: Connection, client: redis.Redis) -> None:
    publish(connection, {"id": "m5"})
    queue = connection.SimpleQueue(QUEUE)
    queue.get(timeout=2)
    queue.close()
    connection.release()
    assert held_lists(client) == {} and client.llen(QUEUE) == 1


def test_a_message_taken_with_basic_get_is_held_and_swept_like_any_other(
        connection: Connection, client: redis.Redis) -> None:
    publish(connection, {"id": "m6"})
    channel = connection.channel()
    message = channel.basic_get(QUEUE)
    assert message is not None and held_lists(client) != {}
    channel._heartbeat.stop()
    assert sweep_until_moved(InflightLedger(client, KEYS, heartbeat_ttl_s=TTL_S)) == 1
    assert client.llen(QUEUE) == 1


def test_a_message_in_a_live_consumers_list_that_it_does_not_hold_is_put_back(
        connection: Connection, client: redis.Redis) -> None:
    """As after a failover that lost an ack, or a requeue that failed while Redis was away."""
    publish(connection, {"id": "m7"})
    queue = connection.SimpleQueue(QUEUE)
    message = queue.get(timeout=2)
    [inflight] = held_lists(client)
    client.lpush(inflight, b'{"headers": {"id": "orphan"}}')
    deadline = time.monotonic() + 30  # two heartbeats apart, on a machine that may be slow
    while client.llen(QUEUE) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    # Put back marked as redelivered (its JSON's first key).
    assert client.lrange(QUEUE, 0, -1) == [
        b'{"x-dualstream-redelivered":1,"headers": {"id": "orphan"}}']
    assert len(client.lrange(inflight, 0, -1)) == 1, "the held message stays held"
    message.ack()
    queue.close()


def test_an_element_that_is_not_a_message_goes_to_the_dead_letter_store_and_stops_nothing(
        connection: Connection, client: redis.Redis) -> None:
    client.lpush(QUEUE, b"not json at all")  # taken first: the oldest
    publish(connection, {"id": "m8"})
    queue = connection.SimpleQueue(QUEUE)
    message = queue.get(timeout=3)
    assert message.payload == {"id": "m8"}
    [letter] = DeadLetterStore(client, KEYS).list()
    assert letter.code is ErrorCode.INVALID_JOB and letter.error.startswith("not a message")
    assert base64.b64decode(letter.raw_body or "") == b"not json at all"
    message.ack()
    assert held_lists(client) == {} and client.llen(QUEUE) == 0
    queue.close()


def test_a_redis_outage_longer_than_the_ttl_sweeps_no_live_consumer(
        owned_redis: Any) -> None:
    """While Redis is down no consumer can beat; afterwards each gets a ttl to beat again."""
    server = owned_redis()
    # A ttl of 3 s: the consumer's first beat after the outage waits for its client to
    # reconnect (with backoff), which a loaded machine may stretch past the usual 1 s.
    ttl_s = 3.0
    with Connection(server.url, transport=InflightTransport, transport_options={
            "heartbeat_interval_s": 0.2, "heartbeat_ttl_s": ttl_s}) as conn:
        publish(conn, {"id": "m9"})
        queue = conn.SimpleQueue(QUEUE)
        message = queue.get(timeout=2)
        server.stop()
        time.sleep(1.5 * ttl_s)
        server.start()
        client = server.client()
        assert sweep_for(InflightLedger(client, KEYS, heartbeat_ttl_s=ttl_s), 2 * ttl_s) == 0
        assert client.llen(QUEUE) == 0 and len(held_lists(client)) == 1
        assert client.hgetall(KEYS.deliveries("m9")) == {}
        message.ack()
        queue.close()


def test_buried_messages_count_towards_the_dead_letter_caps_and_are_trimmed(
        client: redis.Redis) -> None:
    ledger = InflightLedger(client, KEYS, heartbeat_ttl_s=TTL_S, dead_letter_caps=(2, 10**6))
    inflight = KEYS.inflight("gone", QUEUE)
    for n in range(3):
        client.lpush(inflight, f"raw-{n}")
        assert ledger.bury(inflight, f"raw-{n}".encode(), f"letter-{n}", f'{{"n": {n}}}')
        time.sleep(0.01)
    store = DeadLetterStore(client, KEYS, max_entries=2)
    assert set(client.hkeys(KEYS.dead_letters)) == {b"letter-1", b"letter-2"}  # oldest went
    assert store.trimmed() == 1
    assert int(client.hget(KEYS.dead_letter_stats, "bytes") or 0) == 2 * len('{"n": 0}')
    assert store.remove("letter-1") and int(client.hget(KEYS.dead_letter_stats, "bytes")) == 8


def test_a_message_put_back_comes_again_marked_redelivered_once_and_a_first_delivery_is_not(
        connection: Connection, client: redis.Redis) -> None:
    """The mark that tells the worker to look for earlier deliveries' record
    (worker/message_policy.py): set by a requeue and by the sweep, never twice, and gone from
    the payload the consumer sees."""
    publish(connection, {"id": "m8"})
    queue = connection.SimpleQueue(QUEUE)
    first = queue.get(timeout=2)
    assert not first.delivery_info.get("redelivered")
    first.requeue()
    again = queue.get(timeout=2)
    assert again.delivery_info.get("redelivered") is True
    assert again.payload == {"id": "m8"}
    assert "x-dualstream-redelivered" not in again.properties
    again.requeue()  # marked already: not twice
    [raw] = client.lrange(QUEUE, 0, -1)
    assert raw.count(b"x-dualstream-redelivered") == 1
    json.loads(raw)
    # The sweep marks what a dead consumer held.
    client.delete(QUEUE)
    client.rpush(QUEUE, b'{"headers": {"id": "m9"}, "properties": {}}')
    ledger = InflightLedger(client, KEYS, heartbeat_ttl_s=TTL_S)
    dead = KEYS.inflight("dead-consumer", QUEUE)
    client.lmove(QUEUE, dead, "RIGHT", "LEFT")
    ledger.beat([dead])
    # This test's live consumer sweeps too (after each heartbeat): whichever sweep comes first
    # puts the message back.
    deadline = time.monotonic() + 30
    while client.llen(QUEUE) == 0 and time.monotonic() < deadline:
        ledger.sweep()
        time.sleep(0.2)
    assert client.llen(dead) == 0
    assert json.loads(client.lrange(QUEUE, 0, -1)[0]) == {
        "x-dualstream-redelivered": 1, "headers": {"id": "m9"}, "properties": {}}
    queue.close()
