"""The micro-batcher's decisions, on a fake clock; then the staging stage's loop that drives it
with the real queue, where nothing makes it wait. No threads, no sleeps."""

from __future__ import annotations

import queue
from typing import Any

import pytest

from schemas.settings import Settings
from worker.batcher import MicroBatcher
from worker.staging_stage import PipelineStats, StagingStage

WAIT_S = 0.05


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def batcher(clock: FakeClock, max_items: int = 4) -> MicroBatcher[str]:
    return MicroBatcher(max_items, WAIT_S, clock)


def test_a_full_batch_is_due_though_more_is_coming_and_time_is_left(clock: FakeClock) -> None:
    b = batcher(clock, max_items=3)
    for name in "abc":
        assert not b.due(more_coming=True)
        b.add(name)
    assert b.full and b.due(more_coming=True)
    assert b.flush() == ["a", "b", "c"]


def test_a_batch_is_due_once_the_wait_after_its_first_item_runs_out(clock: FakeClock) -> None:
    b = batcher(clock)
    b.add("a")
    clock.advance(WAIT_S * 0.6)
    b.add("b")  # a later item does not extend the wait
    clock.advance(WAIT_S * 0.3)
    assert not b.due(more_coming=True)
    clock.advance(WAIT_S * 0.1)
    assert b.due(more_coming=True)
    assert b.flush() == ["a", "b"]


def test_a_lone_item_goes_at_once_when_nothing_more_is_coming(clock: FakeClock) -> None:
    b = batcher(clock)
    b.add("a")
    assert b.due(more_coming=False)
    assert b.flush() == ["a"]


def test_an_item_being_prepared_holds_the_flush_until_the_wait_runs_out(
        clock: FakeClock) -> None:
    b = batcher(clock)
    b.add("a")
    clock.advance(WAIT_S / 2)
    assert not b.due(more_coming=True)
    assert b.time_left() == pytest.approx(WAIT_S / 2)
    clock.advance(WAIT_S / 2)
    assert b.due(more_coming=True)


def test_an_item_being_prepared_holds_the_flush_until_its_preparation_ends(
        clock: FakeClock) -> None:
    b = batcher(clock)
    b.add("a")
    clock.advance(WAIT_S / 4)
    assert not b.due(more_coming=True)
    b.add("b")  # its preparation finished in time to join
    assert b.due(more_coming=False)
    assert b.flush() == ["a", "b"]


def test_an_empty_batcher_is_never_due(clock: FakeClock) -> None:
    b = batcher(clock)
    clock.advance(WAIT_S * 10)
    assert not b.due(more_coming=False) and not b.full
    assert b.flush() == []


def test_each_batch_starts_its_own_wait(clock: FakeClock) -> None:
    b = batcher(clock)
    b.add("a")
    clock.advance(WAIT_S * 3)
    assert b.flush() == ["a"]
    b.add("b")
    assert b.time_left() == pytest.approx(WAIT_S)
    assert not b.due(more_coming=True)


def test_a_batch_of_one_item_at_most_is_due_as_soon_as_it_has_one(clock: FakeClock) -> None:
    b = batcher(clock, max_items=1)
    b.add("a")
    assert b.due(more_coming=True)


def test_no_wait_flushes_every_batch_at_once(clock: FakeClock) -> None:
    b = MicroBatcher[str](4, 0.0, clock)
    b.add("a")
    assert b.due(more_coming=True)


# --- the staging stage drives it with the ready queue ------------------------------------------


class Preparing:
    def __init__(self, more_coming: bool) -> None:
        self._more_coming = more_coming

    def more_coming(self) -> bool:
        return self._more_coming


def staging_stage(ready: queue.Queue[Any], *, more_coming: bool, max_items: int = 3,
                wait_ms: int = 60_000) -> StagingStage:
    settings = Settings(model="tiny/model", max_batch_items=max_items,
                        max_batch_wait_ms=wait_ms)
    unused: Any = None
    preparing: Any = Preparing(more_coming)
    return StagingStage(settings, unused, preparing, ready, queue.Queue(), unused,
                        PipelineStats())


def test_the_staging_stage_takes_what_is_queued_in_order_and_in_full_batches() -> None:
    ready: queue.Queue[Any] = queue.Queue()
    for name in "abcde":
        ready.put(name)
    stage = staging_stage(ready, more_coming=False)
    assert stage._collect() == ["a", "b", "c"]
    assert stage._collect() == ["d", "e"]


def test_the_staging_stage_does_not_wait_when_the_wait_is_zero_though_more_is_coming() -> None:
    ready: queue.Queue[Any] = queue.Queue()
    ready.put("a")
    assert staging_stage(ready, more_coming=True, wait_ms=0)._collect() == ["a"]
