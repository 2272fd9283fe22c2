"""Ordinary messages share the pipeline; a message whose earlier delivery died runs alone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SuspectGate:
    """Ordinary messages share the pipeline; a suspect message runs alone.

    A suspect is a message whose earlier delivery never finished. While it runs, no other
    message of this process starts (and those running have finished), so if it kills the
    process again, only its own delivery count goes up. Waiting suspects go first.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._suspects_waiting = 0

    @contextmanager
    def enter(self, *, exclusive: bool, timeout: float) -> Iterator[bool]:
        """Yields whether the gate was entered within `timeout` seconds."""
        entered = self._acquire(exclusive, timeout)
        try:
            yield entered
        finally:
            if entered:
                self._release(exclusive)

    def _acquire(self, exclusive: bool, timeout: float) -> bool:
        with self._cond:
            if exclusive:
                self._suspects_waiting += 1
                try:
                    if not self._cond.wait_for(
                            lambda: not self._exclusive and self._shared == 0, timeout):
                        return False
                finally:
                    self._suspects_waiting -= 1
                self._exclusive = True
                return True
            if not self._cond.wait_for(
                    lambda: not self._exclusive and self._suspects_waiting == 0, timeout):
                return False
            self._shared += 1
            return True

    def _release(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._exclusive = False
            else:
                self._shared -= 1
            self._cond.notify_all()
