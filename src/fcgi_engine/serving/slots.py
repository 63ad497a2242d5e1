"""The rules for a generation's worker slots, as pure functions: no I/O, time is an argument.

A slot is one place for a worker. When its worker dies, these rules say how soon it is
replaced: at once when the worker had served or was killed from outside (an OOM killer, an
operator), with a growing back-off only when it keeps dying young on its own (a crash loop), and
never so that a healthy generation is left with no worker at all. They also say which slots a
resize retires or adds, and what a drain does as its deadline passes.
"""

from __future__ import annotations

import enum
import math
import signal
from collections.abc import Sequence
from dataclasses import dataclass

# A worker that lived this long, or served a request, was not crash-looping.
YOUNG_SECONDS = 5.0
# Back-off of a worker that keeps dying young on its own: 0, then BASE * 2**n up to CRASH_MAX.
BACKOFF_BASE = 0.1
CRASH_MAX = 5.0
# A worker killed young from outside, again and again, waits at most this long.
KILLED_MAX = 1.0
# Even an empty pool is not refilled faster than this (a fork storm helps nobody).
MIN_SPAWN_INTERVAL = 0.1
# The most workers one generation runs (the scoreboard has a row for each).
MAX_WORKERS = 256
# Signals a process raises against itself when it crashes; any other signal came from outside.
_CRASH_SIGNALS = frozenset(
    int(s) for s in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL)
)


@dataclass
class Slot:
    index: int
    pid: int = 0
    started: float = 0.0
    failures: int = 0
    respawn_at: float = 0.0
    retired: bool = False
    # The last death was a young crash of its own (the only kind the back-off is for).
    crashed: bool = False
    started_at: float = 0.0  # when its worker started, wall clock
    # Why the generation is replacing its worker ("timeout", "memory"), "" when it is not: the
    # restart is counted under this cause when the worker is reaped.
    recycle: str = ""


@dataclass(frozen=True)
class Death:
    """What the rules need to know of a worker's end."""

    exit_code: int  # os.waitstatus_to_exitcode: negative for a signal
    lived: float
    served: int


def killed_from_outside(exit_code: int) -> bool:
    return exit_code < 0 and -exit_code not in _CRASH_SIGNALS


def after_death(slot: Slot, death: Death, now: float) -> float:
    """Update `slot` for its worker's death; return the delay before its replacement."""
    slot.pid = 0
    young = death.lived < YOUNG_SECONDS and death.served == 0
    if death.exit_code == 0 or not young:
        # A clean exit (max_requests, a drain) or a worker that did its job: replace at once.
        slot.failures = 0
        slot.crashed = False
        delay = 0.0
    elif killed_from_outside(death.exit_code):
        slot.failures += 1
        slot.crashed = False
        delay = (
            0.0 if slot.failures <= 2 else min(BACKOFF_BASE * 2 ** (slot.failures - 2), KILLED_MAX)
        )
    else:
        slot.failures += 1
        slot.crashed = True
        delay = (
            0.0 if slot.failures <= 1 else min(BACKOFF_BASE * 2 ** (slot.failures - 1), CRASH_MAX)
        )
    slot.respawn_at = now + delay
    slot.recycle = ""
    return delay


def restart_cause(slot: Slot, exit_code: int) -> str:
    """Why the worker of `slot`, reaped with `exit_code` while its generation serves, is being
    replaced (one of channel.RESTART_CAUSES): what the generation asked of it, else a clean exit
    is its max_requests and anything else a crash."""
    if slot.recycle:
        return slot.recycle
    return "max_requests" if exit_code == 0 else "crash"


def over_memory(rss: int | None, max_memory: int) -> bool:
    """A worker with this resident size (bytes; None: unknown) is to be recycled."""
    return bool(max_memory) and rss is not None and rss > max_memory


def due(slots: Sequence[Slot], now: float, last_spawn: float) -> list[Slot]:
    """The slots whose worker should be started now.

    A pool with no live worker is not left waiting on a back-off meant for crash loops unless
    every empty slot is crash-looping on its own: the slot due soonest is started at once.
    """
    empty = [s for s in slots if not s.pid and not s.retired]
    ready = [s for s in empty if now >= s.respawn_at]
    alive = any(s.pid for s in slots)
    if not ready and empty and not alive and now - last_spawn >= MIN_SPAWN_INTERVAL:
        healthy = [s for s in empty if not s.crashed]
        if healthy:
            ready = [min(healthy, key=lambda s: s.respawn_at)]
    return ready


def resize(slots: list[Slot], target: int) -> list[Slot]:
    """Make `target` slots (1 to MAX_WORKERS) live: retire the newest live ones past it, bring
    retired ones back, then add new ones. Returns the slots just retired, whose workers are to
    be stopped. A slot brought back or added has no worker; `due` starts it."""
    target = max(1, min(target, MAX_WORKERS))
    live = [s for s in slots if not s.retired]
    retired = []
    while len(live) > target:
        slot = live.pop()
        slot.retired = True
        retired.append(slot)
    for slot in slots:
        if len(live) >= target:
            break
        if slot.retired and slot not in retired:
            slot.retired = False
            slot.respawn_at = 0.0
            live.append(slot)
    while len(live) < target:
        slot = Slot(len(slots))
        slots.append(slot)
        live.append(slot)
    return retired


class State(enum.Enum):
    """What a generation is doing with its workers."""

    SERVING = "serving"  # replace workers that die, kill stuck ones
    DRAINING = "draining"  # workers finish their requests; none is replaced
    STOPPING = "stopping"  # workers were told to quit at once


class DrainStep(enum.Enum):
    DONE = "done"  # no worker left: the generation exits
    WAIT = "wait"  # workers still finishing, within the deadline
    KILL = "kill"  # the deadline passed: kill the workers left (once)


@dataclass
class Drain:
    """A drain under way: workers have until `deadline`; past it they are killed, once."""

    deadline: float = math.inf
    killed: bool = False


def drain_step(drain: Drain, now: float, workers_left: int) -> DrainStep:
    if not workers_left:
        return DrainStep.DONE
    if drain.killed or now <= drain.deadline:
        return DrainStep.WAIT
    drain.killed = True
    return DrainStep.KILL
