"""Per-worker state in shared memory: the generation reads what its workers write.

One fixed slot per worker: pid, busy flag, when the current request started, requests served,
the last heartbeat (monotonic clock, which every process of the host shares), the current
request's method and URI (for the timeout log line and the status page), and the worker's
cumulative request metrics: requests by status class, a duration histogram (non-cumulative
counts per DURATION_BUCKETS bound, plus one above the largest) and the sum of durations.
Writes are a few bytes into an anonymous shared mapping, cheap enough for every request.

Only the worker writes its slot (the generation resets it between workers and marks a stuck
worker idle), so counters need no lock between processes. Every 8-byte field sits on an
8-byte boundary, so the generation never reads half of a counter being written.

A threaded worker has several requests in flight; InFlight shows them in its one slot as the
generation needs them: busy with the oldest (its start and URI, so `timeout` catches the
request that runs longest), idle when none runs, requests counted as they end.
"""

from __future__ import annotations

import bisect
import mmap
import struct
import threading
import time
from dataclasses import dataclass

from fcgi_engine.channel import DURATION_BUCKETS, N_BUCKETS, STATUS_CLASSES

__all__ = [
    "DURATION_BUCKETS",
    "N_BUCKETS",
    "STATUS_CLASSES",
    "InFlight",
    "Scoreboard",
    "WorkerState",
]

PATH_BYTES = 120
METHOD_BYTES = 8
_NONE_CLASS = len(STATUS_CLASSES) - 1
_N_BUCKETS = N_BUCKETS

# One slot, in order: (field, struct code). Standard sizes, explicit padding ("="), so each
# offset is the size of the fields before it and every 8-byte field is 8-aligned. pid first;
# the fields a request changes are contiguous (busy .. heartbeat), so begin() and end() each
# write them with one pack.
SLOT_LAYOUT = (
    ("pid", "i"),
    ("busy", "B"),
    ("_pad", "3x"),
    ("started", "d"),  # when the current request started (wall clock)
    ("requests", "Q"),  # requests served
    ("heartbeat", "d"),  # monotonic clock
    ("by_class", f"{len(STATUS_CLASSES)}Q"),  # requests ended, by status class
    ("buckets", f"{_N_BUCKETS}Q"),  # requests ended, by duration bucket (not cumulative)
    ("duration_sum", "d"),  # seconds, of every request ended
    ("in_flight", "Q"),  # requests running now, when InFlight counts them (else busy means 1)
    ("method", f"{METHOD_BYTES}s"),  # the current request's method, NUL-padded
    ("path", f"{PATH_BYTES}s"),  # the current request's URI, NUL-padded
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
_REQUEST, _REQUEST_AT = _fields("method", "path")  # ... and on what
_DONE, _DONE_AT = _fields("busy", "heartbeat")  # what end() sets
_REQUESTS, _REQUESTS_AT = _fields("requests", "requests")
_HEARTBEAT, _HEARTBEAT_AT = _fields("heartbeat", "heartbeat")
_BY_CLASS_AT = _fields("by_class", "by_class")[1]
_BUCKETS_AT = _fields("buckets", "buckets")[1]
_SUM, _SUM_AT = _fields("duration_sum", "duration_sum")
_IN_FLIGHT, _IN_FLIGHT_AT = _fields("in_flight", "in_flight")
_COUNTER = struct.Struct("=Q")
_ZERO_SLOT = bytes(_SLOT.size)


def status_class(status: int) -> int:
    """The index in STATUS_CLASSES of an HTTP status (0: no response started)."""
    return status // 100 - 1 if 100 <= status < 600 else _NONE_CLASS


def duration_bucket(duration: float) -> int:
    """The index of the histogram bucket that counts `duration`: the first bound of
    DURATION_BUCKETS not below it; len(DURATION_BUCKETS) is the bucket above them all."""
    return bisect.bisect_left(DURATION_BUCKETS, duration)


@dataclass(frozen=True, slots=True)
class WorkerState:
    pid: int
    busy: bool
    started: float
    requests: int
    heartbeat: float
    path: str  # the current request's URI
    method: str = ""
    by_class: tuple[int, ...] = (0,) * len(STATUS_CLASSES)
    buckets: tuple[int, ...] = (0,) * _N_BUCKETS
    duration_sum: float = 0.0
    in_flight: int = 0


class Scoreboard:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, max(1, slots) * _SLOT.size)

    def reset(self, slot: int, pid: int, now: float = 0.0) -> None:
        offset = slot * _SLOT.size
        self._map[offset : offset + _SLOT.size] = _ZERO_SLOT
        _PID.pack_into(self._map, offset + _PID_AT, pid)
        _HEARTBEAT.pack_into(self._map, offset + _HEARTBEAT_AT, now)

    def set_pid(self, slot: int, pid: int) -> None:
        _PID.pack_into(self._map, slot * _SLOT.size + _PID_AT, pid)

    def begin(self, slot: int, now: float, method: str, uri: str) -> None:
        offset = slot * _SLOT.size
        _BUSY.pack_into(self._map, offset + _BUSY_AT, 1, now)
        # "8s" and "120s" truncate longer strings and pad shorter ones with NULs.
        _REQUEST.pack_into(
            self._map,
            offset + _REQUEST_AT,
            method.encode("latin-1", "replace"),
            uri.encode("latin-1", "replace"),
        )

    def record(self, slot: int, status: int, duration: float) -> None:
        """Count one request that ended: by the class of `status` (0: no response started),
        in the bucket of `duration` (seconds), and into the sum of durations."""
        base = slot * _SLOT.size
        for at in (
            base + _BY_CLASS_AT + 8 * status_class(status),
            base + _BUCKETS_AT + 8 * duration_bucket(duration),
        ):
            _COUNTER.pack_into(self._map, at, _COUNTER.unpack_from(self._map, at)[0] + 1)
        at = base + _SUM_AT
        _SUM.pack_into(self._map, at, _SUM.unpack_from(self._map, at)[0] + max(0.0, duration))

    def set_in_flight(self, slot: int, running: int) -> None:
        _IN_FLIGHT.pack_into(self._map, slot * _SLOT.size + _IN_FLIGHT_AT, running)

    def end(self, slot: int, requests: int, heartbeat: float) -> None:
        _DONE.pack_into(self._map, slot * _SLOT.size + _DONE_AT, 0, 0.0, requests, heartbeat)

    def count(self, slot: int, requests: int) -> None:
        _REQUESTS.pack_into(self._map, slot * _SLOT.size + _REQUESTS_AT, requests)

    def heartbeat(self, slot: int, now: float) -> None:
        _HEARTBEAT.pack_into(self._map, slot * _SLOT.size + _HEARTBEAT_AT, now)

    def read(self, slot: int) -> WorkerState:
        values = _SLOT.unpack_from(self._map, slot * _SLOT.size)
        pid, busy, started, requests, beat = values[:5]
        classes_end = 5 + len(STATUS_CLASSES)
        buckets_end = classes_end + _N_BUCKETS
        duration_sum, in_flight, method, path = values[buckets_end:]
        return WorkerState(
            pid,
            bool(busy),
            started,
            requests,
            beat,
            path.rstrip(b"\0").decode("latin-1"),
            method.rstrip(b"\0").decode("latin-1"),
            tuple(values[5:classes_end]),
            tuple(values[classes_end:buckets_end]),
            duration_sum,
            in_flight,
        )


class InFlight:
    """The requests a worker runs at once (its threads, or its ASGI tasks), written to its
    slot as the oldest of them; begin() and end() may be called from several threads."""

    def __init__(self, board: Scoreboard | None, slot: int) -> None:
        self.board = board
        self.slot = slot
        self.ended = 0
        self._lock = threading.Lock()
        # token -> (wall-clock start, method, URI), oldest first: tokens are taken in order,
        # under the lock, and a dict keeps insertion order.
        self._running: dict[int, tuple[float, str, str]] = {}
        self._next = 0

    def begin(self, method: str, uri: str) -> int:
        with self._lock:
            token = self._next
            self._next += 1
            started = time.time()
            self._running[token] = (started, method, uri)
            if self.board is not None:
                self.board.set_in_flight(self.slot, len(self._running))
                if len(self._running) == 1:
                    self.board.begin(self.slot, started, method, uri)
            return token

    def end(self, token: int, status: int, duration: float) -> None:
        """The request of `token` ended with HTTP `status` (0: no response started) after
        `duration` seconds."""
        with self._lock:
            running = self._running
            was_oldest = next(iter(running)) == token
            del running[token]
            self.ended += 1
            board = self.board
            if board is None:
                return
            board.record(self.slot, status, duration)
            board.set_in_flight(self.slot, len(running))
            if not running:
                board.end(self.slot, self.ended, time.monotonic())
                return
            board.count(self.slot, self.ended)
            if was_oldest:
                board.begin(self.slot, *next(iter(running.values())))

    def oldest(self) -> tuple[float, str] | None:
        """The oldest request running: its wall-clock start and its URI."""
        with self._lock:
            first = next(iter(self._running.values()), None)
            return None if first is None else (first[0], first[2])
