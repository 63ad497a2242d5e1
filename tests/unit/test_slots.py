"""The generation's slot rules (serving/slots.py): respawn back-off, resize, drain deadline.
Pure functions with time as an argument, so each rule is a millisecond test."""

from __future__ import annotations

import math
import signal

from fcgi_engine.serving.slots import (
    CRASH_MAX,
    KILLED_MAX,
    MAX_WORKERS,
    Death,
    Drain,
    DrainStep,
    Slot,
    after_death,
    drain_step,
    due,
    resize,
)


def test_a_worker_that_served_and_was_killed_is_replaced_at_once() -> None:
    slot = Slot(0, pid=10, started=0.0)
    for n in range(10):
        assert after_death(slot, Death(-signal.SIGKILL, lived=2.0, served=5), now=n) == 0.0
        slot.pid = 11
    assert slot.failures == 0


def test_an_old_worker_killed_before_serving_is_replaced_at_once() -> None:
    slot = Slot(0, pid=10)
    assert after_death(slot, Death(-signal.SIGKILL, lived=60.0, served=0), now=60) == 0.0


def test_young_kills_from_outside_back_off_at_most_a_second() -> None:
    slot = Slot(0, pid=10)
    delays = [after_death(slot, Death(-signal.SIGKILL, 0.1, 0), now=n) for n in range(12)]
    assert delays[:2] == [0.0, 0.0]
    assert max(delays) == KILLED_MAX
    assert not slot.crashed


def test_a_crash_loop_backs_off_up_to_its_cap() -> None:
    slot = Slot(0, pid=10)
    delays = [after_death(slot, Death(1, 0.1, 0), now=n) for n in range(12)]
    assert delays[0] == 0.0
    assert delays == sorted(delays)
    assert delays[-1] == CRASH_MAX
    assert slot.crashed
    # A segfault is a crash of its own too.
    segv = Slot(1, pid=11)
    after_death(segv, Death(-signal.SIGSEGV, 0.1, 0), now=0)
    assert segv.crashed
    # A clean exit resets everything.
    assert after_death(slot, Death(0, 0.1, 0), now=20) == 0.0 and slot.failures == 0


def test_an_empty_pool_is_refilled_at_once_unless_every_slot_crash_loops() -> None:
    killed = Slot(0, respawn_at=10.0)
    crashing = Slot(1, respawn_at=8.0, crashed=True)
    assert due([killed, crashing], now=5.0, last_spawn=0.0) == [killed]
    # Not faster than the minimum interval.
    assert due([killed, crashing], now=5.0, last_spawn=4.99) == []
    # With a live worker the back-off stands.
    live = Slot(2, pid=99)
    assert due([killed, live], now=5.0, last_spawn=0.0) == []
    # Only crash-loopers: they wait out their back-off.
    assert due([crashing], now=5.0, last_spawn=0.0) == []
    assert due([crashing], now=8.0, last_spawn=0.0) == [crashing]
    assert due([Slot(3, retired=True)], now=5.0, last_spawn=0.0) == []


def test_shrinking_retires_the_newest_slots_and_returns_them_to_stop() -> None:
    slots = [Slot(i, pid=100 + i) for i in range(4)]
    retired = resize(slots, 2)
    assert [s.index for s in retired] == [3, 2]
    assert [s.retired for s in slots] == [False, False, True, True]
    # Never below one worker.
    assert [s.index for s in resize(slots, 0)] == [1]
    assert sum(not s.retired for s in slots) == 1


def test_growing_brings_retired_slots_back_before_adding_new_ones() -> None:
    slots = [Slot(0, pid=100), Slot(1, retired=True, respawn_at=50.0)]
    assert resize(slots, 3) == []
    assert [s.index for s in slots] == [0, 1, 2]
    assert not any(s.retired for s in slots)
    # Brought back with no back-off left over, and due at once.
    assert slots[1].respawn_at == 0.0
    assert due(slots, now=1.0, last_spawn=0.0) == [slots[1], slots[2]]


def test_a_resize_is_capped_at_the_scoreboard_size() -> None:
    slots = [Slot(0, pid=1)]
    resize(slots, MAX_WORKERS + 10)
    assert len(slots) == MAX_WORKERS


def test_a_drain_waits_until_its_deadline_then_kills_once() -> None:
    drain = Drain(deadline=10.0)
    assert drain_step(drain, now=5.0, workers_left=2) is DrainStep.WAIT
    assert drain_step(drain, now=10.0, workers_left=2) is DrainStep.WAIT
    assert drain_step(drain, now=10.5, workers_left=2) is DrainStep.KILL
    # Killed once: what is left is waited for (it dies of SIGKILL), never killed again.
    assert drain_step(drain, now=11.0, workers_left=2) is DrainStep.WAIT
    assert drain_step(drain, now=12.0, workers_left=0) is DrainStep.DONE


def test_a_drain_ends_as_soon_as_no_worker_is_left() -> None:
    assert drain_step(Drain(deadline=10.0), now=1.0, workers_left=0) is DrainStep.DONE
    assert Drain().deadline == math.inf
    assert drain_step(Drain(), now=1e12, workers_left=1) is DrainStep.WAIT
