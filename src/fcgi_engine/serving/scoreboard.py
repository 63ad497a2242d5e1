"""Per-worker state in shared memory: the generation reads what its workers write.

One fixed slot per worker: pid, busy flag, when the current request started, requests served,
the last heartbeat (monotonic clock, which every process of the host shares) and the current
request's path (for the timeout log line). Writes are a few bytes into an anonymous shared
mapping, cheap enough for every request.

A threaded worker has several requests in flight; InFlight shows them in its one slot as the
generation needs them: busy with the oldest (its start and path, so `timeout` catches the
request that runs longest), idle when none runs, requests counted as they end.
"""

from __future__ import annotations

import mmap
import struct
import threading
import time
from dataclasses import dataclass

PATH_BYTES = 120
# One slot, in order: (field, struct code). Standard sizes, no padding ("="), so each offset is
# the size of the fields before it. pid first; the fields a request changes are contiguous
# (busy .. heartbeat), so begin() and end() each write them with one pack.
SLOT_LAYOUT = (
    ("pid", "i"),
    ("busy", "B"),
    ("started", "d"),  # when the current request started (wall clock)
    ("requests", "Q"),  # requests served
    ("heartbeat", "d"),  # monotonic clock
    ("path", f"{PATH_BYTES}s"),  # the current request's path, NUL-padded
)
_NAMES = [name for name, _code in SLOT_LAYOUT]


def _fields(first: str, last: str) -> tuple[struct.Struct, int]:
    """The Struct of the fields `first` to `last` of SLOT_LAYOUT, and its offset in a slot."""
    i, j = _NAMES.index(first), _NAMES.index(last) + 1
    offset = struct.calcsize("=" + "".join(code for _name, code in SLOT_LAYOUT[:i]))
    return struct.Struct("=" + "".join(code for _name, code in SLOT_LAYOUT[i:j])), offset


_SLOT, _ = _fields("pid", "path")
_PID, _PID_AT = _fields("pid", "pid")
_BUSY, _BUSY_AT = _fields("busy", "started")  # what begin() sets
_DONE, _DONE_AT = _fields("busy", "heartbeat")  # what end() sets
_REQUESTS, _REQUESTS_AT = _fields("requests", "requests")
_HEARTBEAT, _HEARTBEAT_AT = _fields("heartbeat", "heartbeat")
_PATH, _PATH_AT = _fields("path", "path")


@dataclass(frozen=True, slots=True)
class WorkerState:
    pid: int
    busy: bool
    started: float
    requests: int
    heartbeat: float
    path: str


class Scoreboard:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, max(1, slots) * _SLOT.size)

    def reset(self, slot: int, pid: int, now: float = 0.0) -> None:
        _SLOT.pack_into(self._map, slot * _SLOT.size, pid, 0, 0.0, 0, now, b"")

    def set_pid(self, slot: int, pid: int) -> None:
        _PID.pack_into(self._map, slot * _SLOT.size + _PID_AT, pid)

    def begin(self, slot: int, now: float, path: str) -> None:
        offset = slot * _SLOT.size
        _BUSY.pack_into(self._map, offset + _BUSY_AT, 1, now)
        # "120s" truncates a longer path and pads a shorter one with NULs.
        _PATH.pack_into(self._map, offset + _PATH_AT, path.encode("latin-1", "replace"))

    def end(self, slot: int, requests: int, heartbeat: float) -> None:
        _DONE.pack_into(self._map, slot * _SLOT.size + _DONE_AT, 0, 0.0, requests, heartbeat)

    def count(self, slot: int, requests: int) -> None:
        _REQUESTS.pack_into(self._map, slot * _SLOT.size + _REQUESTS_AT, requests)

    def heartbeat(self, slot: int, now: float) -> None:
        _HEARTBEAT.pack_into(self._map, slot * _SLOT.size + _HEARTBEAT_AT, now)

    def read(self, slot: int) -> WorkerState:
        pid, busy, started, requests, beat, path = _SLOT.unpack_from(self._map, slot * _SLOT.size)
        return WorkerState(
            pid, bool(busy), started, requests, beat, path.rstrip(b"\0").decode("latin-1")
        )


class InFlight:
    """The requests a worker runs at once (its threads, or its ASGI tasks), written to its
    slot as the oldest of them; begin() and end() may be called from several threads."""

    def __init__(self, board: Scoreboard | None, slot: int) -> None:
        self.board = board
        self.slot = slot
        self.ended = 0
        self._lock = threading.Lock()
        # token -> (wall-clock start, path), oldest first: tokens are taken in order, under the
        # lock, and a dict keeps insertion order.
        self._running: dict[int, tuple[float, str]] = {}
        self._next = 0

    def begin(self, path: str) -> int:
        with self._lock:
            token = self._next
            self._next += 1
            started = time.time()
            self._running[token] = (started, path)
            if len(self._running) == 1 and self.board is not None:
                self.board.begin(self.slot, started, path)
            return token

    def end(self, token: int) -> None:
        with self._lock:
            running = self._running
            was_oldest = next(iter(running)) == token
            del running[token]
            self.ended += 1
            board = self.board
            if board is None:
                return
            if not running:
                board.end(self.slot, self.ended, time.monotonic())
                return
            board.count(self.slot, self.ended)
            if was_oldest:
                board.begin(self.slot, *next(iter(running.values())))

    def oldest(self) -> tuple[float, str] | None:
        with self._lock:
            return next(iter(self._running.values()), None)
