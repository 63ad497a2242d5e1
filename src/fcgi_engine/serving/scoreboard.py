"""Per-worker state in shared memory: the generation reads what its workers write.

One fixed slot per worker: pid, busy flag, when the current request started, requests served,
the last heartbeat (monotonic clock, which every process of the host shares) and the current
request's path (for the timeout log line). Writes are a few bytes into an anonymous shared
mapping, cheap enough for every request.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

PATH_BYTES = 120
# One slot: pid, then the fields a request changes, then the path.
_PID = struct.Struct("=i")
_BUSY = struct.Struct("=Bd")  # busy, started (wall clock)
_DONE = struct.Struct("=BdQd")  # busy, started, requests, heartbeat
_HEARTBEAT = struct.Struct("=d")
_SLOT = struct.Struct(f"=iBdQd{PATH_BYTES}s")
_BUSY_AT = _PID.size
_HEARTBEAT_AT = _PID.size + struct.calcsize("=BdQ")
_PATH_AT = _SLOT.size - PATH_BYTES


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
        _PID.pack_into(self._map, slot * _SLOT.size, pid)

    def begin(self, slot: int, now: float, path: str) -> None:
        offset = slot * _SLOT.size
        _BUSY.pack_into(self._map, offset + _BUSY_AT, 1, now)
        raw = path.encode("latin-1", "replace")[:PATH_BYTES]
        self._map[offset + _PATH_AT : offset + _SLOT.size] = raw.ljust(PATH_BYTES, b"\0")

    def end(self, slot: int, requests: int, heartbeat: float) -> None:
        _DONE.pack_into(self._map, slot * _SLOT.size + _BUSY_AT, 0, 0.0, requests, heartbeat)

    def heartbeat(self, slot: int, now: float) -> None:
        _HEARTBEAT.pack_into(self._map, slot * _SLOT.size + _HEARTBEAT_AT, now)

    def read(self, slot: int) -> WorkerState:
        pid, busy, started, requests, beat, path = _SLOT.unpack_from(self._map, slot * _SLOT.size)
        return WorkerState(
            pid, bool(busy), started, requests, beat, path.rstrip(b"\0").decode("latin-1")
        )
