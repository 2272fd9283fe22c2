"""Kombu's Redis transport with a fetch that records the message as held in the same command.

Kombu's own Redis transport takes a message with `BRPOP` and records it as unacknowledged with
a second command on another connection after an event-loop pass: a consumer killed in between
(10–50 ms, seen in chaos runs) loses the message. Its recovery sweep also takes a lock that a
killed consumer holds for five minutes. Here (`control/inflight.py` has the protocol):

- the fetch is `BLMOVE queue inflight RIGHT LEFT` into this channel's own in-flight list;
- an ack removes the message from that list; a reject with requeue, or a channel closing with
  messages it never handed out, moves them back in one script, marked redelivered (kombu's
  `delivery_info.redelivered` once fetched again);
- a heartbeat thread keeps the list alive and sweeps the lists of consumers that stopped
  beating, without a lock.

Everything else (publishing, fan-out for Celery's events and remote control, reconnection) is
kombu's. A channel consumes its queues in turn, blocking on one at a time; dualstream's workers
consume one queue each. Priorities are not supported: each queue is one list.

With `replicas_to_ack` (Sentinel deployments), a publish is acknowledged only once that many
replicas have it (`WAIT`, on the connection that pushed it): a failover cannot lose an enqueue
that was acknowledged; one that timed out fails and is published again (jobs are idempotent).

The transport options it adds: `dualstream_key_prefix`, `heartbeat_interval_s`,
`heartbeat_ttl_s`, `replicas_to_ack`, `replicas_ack_timeout_ms`, `dead_letter_max_entries`,
`dead_letter_max_bytes` (set by `control/broker.py`
from the settings). `InflightSentinelTransport` is the same over Redis Sentinel.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty
from kombu.utils.json import dumps, loads

from control.deadletters import MAX_BYTES, MAX_ENTRIES, dead_letter
from control.inflight import REDELIVERED_KEY, Heartbeat, InflightLedger
from schemas.errors import ErrorCode
from schemas.keys import RedisKeys

log = logging.getLogger(__name__)


class EnqueueNotReplicated(RuntimeError):
    """A publish that did not reach `replicas_to_ack` replicas in time; not retried by
    Celery (it is not a connection error), since the message is already on the queue."""


def push_replicated(client: Any, messages: list[tuple[str, bytes | str]], replicas: int,
                    timeout_ms: int, tries: int = 3) -> None:
    """LPUSH each (queue, message) in one round trip, then, with `replicas`, WAIT until that
    many replicas have them (`execute_replicated`)."""
    def push(pipe: Any) -> None:
        for queue, raw in messages:
            pipe.lpush(queue, raw)

    execute_replicated(client, push, replicas, timeout_ms, tries)


def execute_replicated(client: Any, commands: Callable[[Any], None], replicas: int,
                       timeout_ms: int, tries: int = 3) -> list[Any]:
    """Send `commands(pipe)` in one round trip, followed, with `replicas`, by up to `tries`
    WAITs for that many replicas on the same connection (a WAIT on another connection would
    not wait for these writes); raises `EnqueueNotReplicated` if they do not all get there.
    The replies of `commands`."""
    with client.pipeline(transaction=False) as pipe:
        commands(pipe)
        for _ in range(tries if replicas else 0):
            pipe.execute_command("WAIT", replicas, timeout_ms)
        replies = list(pipe.execute())
    if not replicas:
        return replies
    acked = max(int(reply) for reply in replies[-tries:])
    if acked < replicas:
        raise EnqueueNotReplicated(
            f"the enqueue reached {acked} of {replicas} replicas in {tries} × {timeout_ms} ms: "
            "it may be lost at a failover; submit it again (jobs are idempotent)")
    return replies[:-tries]


class InflightQoS(kombu_redis.QoS):
    """Acknowledgement against the channel's in-flight list instead of kombu's unacked hash."""

    def append(self, message: Any, delivery_tag: str) -> None:
        super(kombu_redis.QoS, self).append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        self.channel.ack_held(delivery_tag)
        super(kombu_redis.QoS, self).ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if requeue:
            self.channel.requeue_held(delivery_tag, front=False)
        else:
            self.channel.ack_held(delivery_tag)
        super(kombu_redis.QoS, self).ack(delivery_tag)

    def restore_unacked(self, client: Any = None) -> None:
        for tag in list(self._delivered):
            self.channel.requeue_held(tag, front=True)
        self._delivered.clear()

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        """Recovery is the heartbeat thread's sweep, not kombu's visibility-timeout scan."""


class InflightChannel(kombu_redis.Channel):
    QoS = InflightQoS
    priority_steps = [0]  # noqa: RUF012 - kombu's own attribute: one list per queue
    dualstream_key_prefix = "ds"
    heartbeat_interval_s = 2.0
    heartbeat_ttl_s = 15.0
    hold_limit_s = 300.0
    replicas_to_ack = 0
    replicas_ack_timeout_ms = 2000
    replicas_ack_tries = 3
    dead_letter_max_entries = MAX_ENTRIES
    dead_letter_max_bytes = MAX_BYTES
    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.Channel.from_transport_options,
        "dualstream_key_prefix", "heartbeat_interval_s", "heartbeat_ttl_s", "hold_limit_s",
        "replicas_to_ack", "replicas_ack_timeout_ms", "dead_letter_max_entries",
        "dead_letter_max_bytes",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.consumer_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._keys = RedisKeys(self.dualstream_key_prefix)
        self._held: dict[str, tuple[str, str, bytes]] = {}  # tag → (inflight, queue, raw)
        self._watched: set[str] = set()
        self._no_ack: set[str] = set()
        self._fetching: str | None = None  # the queue of a BLMOVE whose reply is unread
        self._unheld: set[tuple[str, bytes]] = set()
        self._heartbeat: Heartbeat | None = None
        self._ledger: InflightLedger | None = None

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        """Fail like a lost connection once this channel's connection is closed.

        After a broker outage Celery closes the old connection while tasks still run; kombu
        5.7 raises AttributeError here then, which Celery treats as unrecoverable (the worker
        exited in the Redis-restart test). A ConnectionError is logged and skipped instead.
        """
        transport = self.connection
        if transport is None or transport.client is None:
            raise redis.ConnectionError("this broker channel's connection was closed")
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
        return params

    # The fetch ---------------------------------------------------------------------------
    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        consumer_tag = super().basic_consume(queue, no_ack, *args, **kwargs)
        if queue in self._fanout_queues:
            return consumer_tag  # pub/sub (Celery's events and remote control): nothing held
        if no_ack:
            self._no_ack.add(queue)
        self._watch(queue)  # before the first fetch, which only drain_events does
        return consumer_tag

    def _watch(self, queue: str) -> None:
        """Register this consumer's in-flight list for `queue` before anything is fetched into
        it, so that a sweep finds it whenever this consumer dies."""
        if queue in self._watched:
            return
        self._watched.add(queue)
        if self._heartbeat is None:
            self._heartbeat = Heartbeat(self.ledger, self._inflight_keys,
                                        interval_s=self.heartbeat_interval_s,
                                        name=f"ds-heartbeat-{self.consumer_id}",
                                        reconcile=self._reconcile)
            self._heartbeat.start()
        else:
            self._heartbeat.beat_once()

    def _reconcile(self) -> None:
        """Put back what this consumer's lists hold but the consumer does not: an ack that a
        failover lost, or a requeue that failed while Redis was away. A message must be seen
        so twice, a beat apart, since a fetch lands in the list just before it is recorded."""
        held = {raw for _, _, raw in list(self._held.values())}
        unheld = set()
        for queue in list(self._watched):
            inflight = self._keys.inflight(self.consumer_id, queue)
            listed = self.ledger.listed(inflight)
            if self._fetching == queue:
                listed = listed[1:]  # the newest may be a fetch whose reply is not read yet
            for raw in listed:
                if raw in held:
                    continue
                if (inflight, raw) in self._unheld:
                    self.ledger.requeue(inflight, queue, raw, front=True)
                else:
                    unheld.add((inflight, raw))
        self._unheld = unheld

    def _inflight_keys(self) -> list[str]:
        return [self._keys.inflight(self.consumer_id, queue) for queue in list(self._watched)]

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        queue = queues[0]
        self._in_poll = self.client.connection
        self._brpop_sent_at = kombu_redis.monotonic()  # type: ignore[assignment]
        self._fetching = queue
        self.client.connection.send_command(
            "BLMOVE", queue, self._keys.inflight(self.consumer_id, queue), "RIGHT", "LEFT",
            self.brpop_timeout if timeout is None else (timeout or 0))

    def _brpop_read(self, **options: Any) -> bool:
        queue = self._fetching
        try:
            try:
                raw = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if raw is None or queue is None:
                raise Empty()
            self._queue_cycle.rotate(queue)
            payload = self._hold(raw, queue)
            if payload is not None:
                self.connection._deliver(payload, queue)
                if queue in self._no_ack:
                    self.ack_held(payload["properties"]["delivery_tag"])
            return True
        finally:
            self._fetching = None
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self.ack_held(message.delivery_tag)
        return message

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        self._watch(queue)
        with self.conn_or_acquire() as client:
            raw = client.lmove(queue, self._keys.inflight(self.consumer_id, queue),
                               "RIGHT", "LEFT")
        payload = None if raw is None else self._hold(raw, queue)
        if payload is None:
            raise Empty()
        return payload

    def _hold(self, raw: bytes, queue: str) -> Any:
        """Record a fetched message as held; the payload, or None for an element that is not
        a message at all, which goes to the dead-letter store (delivered, it would stop the
        consumer; put back, every consumer in turn)."""
        inflight = self._keys.inflight(self.consumer_id, queue)
        try:
            payload = loads(raw)
            tag = payload["properties"]["delivery_tag"]
            if payload.pop(REDELIVERED_KEY, None):
                payload["properties"].setdefault("delivery_info", {})["redelivered"] = True
            self._held[tag] = (inflight, queue, raw)
        except Exception as exc:  # noqa: BLE001 - any element that does not decode
            letter = dead_letter(payload=None, code=ErrorCode.INVALID_JOB, message_id=None,
                                 error=f"not a message: {type(exc).__name__}: {exc}",
                                 deliveries=1, queue=queue, raw_body=raw)
            self.ledger.bury(inflight, raw, letter.id, letter.model_dump_json())
            log.error("dead-lettered an element of %s that is not a message: %s (%s)", queue,
                      letter.id, exc)
            return None
        return payload

    # Publishing --------------------------------------------------------------------------
    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        if not self.replicas_to_ack or kwargs.get("_publish_batch") is not None:
            super()._put(queue, message, **kwargs)
            return
        with self.conn_or_acquire() as client:
            push_replicated(client, [(queue, dumps(message))], self.replicas_to_ack,
                            self.replicas_ack_timeout_ms, self.replicas_ack_tries)

    # Settling ----------------------------------------------------------------------------
    @property
    def ledger(self) -> InflightLedger:
        """On a client of its own: acks come from worker threads, and may outlive the
        connection this channel consumed on."""
        if self._ledger is None:
            self._ledger = InflightLedger(
                redis.Redis(connection_pool=self.pool), self._keys,
                heartbeat_ttl_s=self.heartbeat_ttl_s,
                dead_letter_caps=(self.dead_letter_max_entries, self.dead_letter_max_bytes))
        return self._ledger

    def ack_held(self, tag: str) -> None:
        held = self._held.pop(tag, None)
        if held is not None:
            self.ledger.ack(held[0], held[2])

    def requeue_held(self, tag: str, *, front: bool) -> None:
        held = self._held.pop(tag, None)
        if held is not None:
            inflight, queue, raw = held
            self.ledger.requeue(inflight, queue, raw, front=front)

    def _restore(self, message: Any, leftmost: bool = False) -> None:
        self.requeue_held(message.delivery_tag, front=not leftmost)

    def close(self) -> None:
        """Closing puts back what was never handed out (`restore_unacked`); messages still
        being worked on (after a reconnect, tasks go on) stay held, and beaten for, until they
        are settled or the hold limit passes; a sweep takes what is left after that."""
        super().close()
        if self._heartbeat is not None:
            self._heartbeat.retire(lambda: not self._held, self.hold_limit_s)


class InflightTransport(kombu_redis.Transport):
    """Use as `broker_transport = "control.transport:InflightTransport"`."""

    Channel = InflightChannel


class InflightSentinelChannel(InflightChannel, kombu_redis.SentinelChannel):
    from_transport_options = (  # type: ignore[assignment]
        *InflightChannel.from_transport_options,
        *(option for option in kombu_redis.SentinelChannel.from_transport_options
          if option not in InflightChannel.from_transport_options),
    )


class InflightSentinelTransport(kombu_redis.SentinelTransport):
    """The same over Redis Sentinel: `sentinel://` URLs and the `master_name` option."""

    Channel = InflightSentinelChannel
