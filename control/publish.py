"""Publishing job messages fast: Celery task messages (protocol 2) built here and pushed in one
round trip per batch, with the run's counters moved by the same script.

Celery's `send_task` spends about a millisecond of Python on each message (its headers, a repr
of the arguments for its logs, kombu's envelope, a round trip of its own), which caps a bulk
producer near 6,000 jobs a second at 32 jobs a message. The messages built here are the ones
`send_task` sends through this project's Redis transport, field for field (tests/test_publish.py
compares them), so a worker cannot tell them apart.

A batch's pushes, its run's `queued` count and cursor, and single submissions' `queued`
records are one script, run once per call (a token key): a producer killed mid-batch leaves
all of it or none, and redis-py sending the script again after a lost reply changes nothing.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from control.transport import execute_replicated
from schemas.keys import TASK_NAME, RedisKeys
from schemas.settings import Settings

_COMPACT = (",", ":")
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
TOKEN_TTL_S = 3600
# Publishing rides out a minute with no primary to connect to; past that (the client's own
# retries may have used it up already) the error is raised.
PUBLISH_RETRY_S = 60.0

# KEYS: the call's token, the run's counters (the token again without a run), one queue per
# message, then the records of each message's single submissions, message by message.
# ARGV: jobs to count (-1: no run), cursor ('' for none), token ttl, run and record ttl,
# mode (0, 1 resend, 2 force), the call's id; then per message its body and how many records
# it has. A message with records is pushed when one of its jobs is new or failed (now
# queued), or with resend or force; a record that says queued, being written or done is
# never set back, except with force, which sets every record it names back to queued (a
# worker's reservation takes a queued record: control/results.py).
_PUBLISH = """
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[3]) then return 0 end
local ttl, mine = ARGV[4], 'q' .. ARGV[6]
local resend, force = ARGV[5] ~= '0', ARGV[5] == '2'
local messages = (#ARGV - 6) / 2
local record = 2 + messages
for m = 1, messages do
  local jobs = tonumber(ARGV[6 + 2 * m])
  local send = jobs == 0 or resend
  for _ = 1, jobs do
    record = record + 1
    local state = string.sub(redis.call('GET', KEYS[record]) or '', 1, 1)
    if state == '' or state == 'f' or force then
      redis.call('SET', KEYS[record], mine, 'EX', ttl)
      send = true
    end
  end
  if send then redis.call('LPUSH', KEYS[2 + m], ARGV[5 + 2 * m]) end
end
if ARGV[1] ~= '-1' then
  redis.call('HINCRBY', KEYS[2], 'queued', ARGV[1])
  if ARGV[2] ~= '' then redis.call('HSET', KEYS[2], 'cursor', ARGV[2]) end
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return 1
"""


@dataclass(frozen=True)
class RunCount:
    """What a batch adds to its run: jobs sent for the first time, and the last source."""

    run_id: str
    queued: int
    cursor: str | None = None


class TaskPublisher:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self._redis = client
        self._keys = RedisKeys(settings.key_prefix)
        self._run_ttl_s = settings.result_ttl_s
        self._replicas = settings.redis_replicas_to_ack
        self._timeout_ms = settings.redis_replicas_ack_timeout_ms
        self._origin = f"gen{os.getpid()}@{socket.gethostname()}"
        self._reply_to = str(uuid.uuid4())
        self._script = client.register_script(_PUBLISH)

    def publish(self, messages: Sequence[tuple[str, dict[str, Any]]],
                count: RunCount | None = None, *,
                records: Sequence[Sequence[str]] | None = None, resend: bool = False,
                force: bool = False) -> None:
        """Send each (queue, job message) as one `dualstream.process` task and add `count`
        to its run, all in one script and one round trip (acknowledged by
        `redis_replicas_to_ack` replicas, where set).

        `records`, per message, names single submissions' jobs: each new or failed one gets
        a `queued` record, and a message none of whose jobs is (all queued, being written or
        done already) is not sent, unless `resend`. With `force`, every record named goes
        back to `queued`, done ones included, and every message is sent: the jobs run again."""
        if not messages and count is None:
            return
        call = uuid.uuid4().hex
        token = self._keys.publish_token(call)
        job_ids = records or [()] * len(messages)
        keys = [token, self._keys.run(count.run_id) if count else token]
        keys += [queue for queue, _ in messages]
        keys += [self._keys.record(job_id) for ids in job_ids for job_id in ids]
        args: list[str | bytes | int] = [count.queued if count else -1,
                                         (count.cursor or "") if count else "", TOKEN_TTL_S,
                                         self._run_ttl_s, 2 if force else int(resend),
                                         call[:8]]
        for (queue, argument), ids in zip(messages, job_ids, strict=True):
            args += [self.task_message(queue, argument), len(ids)]
        deadline = time.monotonic() + PUBLISH_RETRY_S
        for attempt in itertools.count():
            try:
                self._send(keys, args)
                return
            except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.NoScriptError):
                # redis-py retries a command, but not the pool's taking of a connection (at
                # a failover: no primary yet), and a pipeline it resends after reconnecting
                # (to a new primary, or a restarted Redis) is not checked for its script
                # again. The call's token makes sending it again safe.
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(2.0, 0.1 * 2 ** attempt))

    def _send(self, keys: list[str], args: list[str | bytes | int]) -> None:
        if not self._replicas:
            self._script(keys=keys, args=args)  # EVALSHA: one round trip
            return
        # A pipeline, so that the WAITs go on the connection that wrote (redis-py checks the
        # script with SCRIPT EXISTS first: one more round trip, where replicas are awaited).
        execute_replicated(self._redis,
                           lambda pipe: self._script(keys=keys, args=args, client=pipe),
                           self._replicas, self._timeout_ms)

    def task_message(self, queue: str, argument: dict[str, Any]) -> bytes:
        task_id = str(uuid.uuid4())
        argsrepr = f"[<{len(argument.get('jobs') or [])} jobs>]"
        body = json.dumps([[argument], {}, _EMBED], separators=_COMPACT, ensure_ascii=False)
        return json.dumps({
            "body": body, "content-encoding": "utf-8", "content-type": "application/json",
            "headers": {
                "lang": "py", "task": TASK_NAME, "id": task_id, "shadow": None, "eta": None,
                "expires": None, "group": None, "group_index": None, "retries": 0,
                "timelimit": [None, None], "root_id": task_id, "parent_id": None,
                "argsrepr": argsrepr, "kwargsrepr": "{}", "origin": self._origin,
                "ignore_result": None, "replaced_task_nesting": 0, "stamped_headers": None,
                "stamps": {}},
            "properties": {
                "correlation_id": task_id, "reply_to": self._reply_to, "argsrepr": argsrepr,
                "kwargsrepr": "{}", "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                "body_encoding": "utf-8", "delivery_tag": str(uuid.uuid4())},
        }, separators=_COMPACT, ensure_ascii=False).encode()
