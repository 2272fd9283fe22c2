"""Celery task events in batches: one PUBLISH for many events instead of one for each.

Celery sends three task events a message (received, started, succeeded), each its own PUBLISH
and round trip to Redis: at 32 jobs a message, more Redis work than the message's fetch and
ack. Its dispatcher can hold the task group's events and send them as one `task.multi`
message, which every receiver (Flower, `celery events`) reads event by event; Celery itself
flushes that buffer at the next turn of its event loop, which in practice sends each event
alone. This consumer step flushes it every `flush_s`, or once `limit` events wait: Flower sees
a task at most `flush_s` late. Worker events (heartbeats, online, offline) are sent as before.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps

from worker.tasks import app_settings

# Events a `task.multi` message holds at most: a few hundred bytes each.
LIMIT = 256


class BufferedTaskEvents(bootsteps.StartStopStep):
    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self._timer_entry: Any = None

    def start(self, c: Any) -> None:
        dispatcher = c.event_dispatcher
        flush_s = app_settings(c.app).task_events_flush_s
        if flush_s <= 0 or dispatcher is None or not dispatcher.enabled:
            return
        # Celery's Events step makes a new dispatcher at every (re)connection: this step starts
        # after it each time.
        dispatcher.buffer_group = frozenset({"task"})
        dispatcher.buffer_limit = LIMIT
        dispatcher.on_send_buffered = None  # no flush per event
        self._timer_entry = c.timer.call_repeatedly(flush_s, self._flush, (c,))

    def stop(self, c: Any) -> None:
        if self._timer_entry is not None:
            self._timer_entry.cancel()
            self._timer_entry = None
        self._flush(c)  # before Events closes the dispatcher: this step stops first

    shutdown = stop

    @staticmethod
    def _flush(c: Any) -> None:
        dispatcher = c.event_dispatcher
        if dispatcher is not None and dispatcher.enabled:
            dispatcher.flush(errors=False, groups=True)
