"""Per-worker state in shared memory: the generation reads what its workers write.

One fixed slot per worker: pid, busy flag, when the current request started, requests served,
and the current request's path (for the timeout log line). Writes are a few bytes into an
anonymous shared mapping, cheap enough for every request.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass

_SLOT = struct.Struct("=iBdQ120s")
_PID = struct.Struct("=i")
_BUSY = struct.Struct("=Bd")
_DONE = struct.Struct("=BdQ")


@dataclass(frozen=True, slots=True)
class WorkerState:
    pid: int
    busy: bool
    started: float
    requests: int
    path: str


class Scoreboard:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._map = mmap.mmap(-1, max(1, slots) * _SLOT.size)

    def reset(self, slot: int, pid: int) -> None:
        _SLOT.pack_into(self._map, slot * _SLOT.size, pid, 0, 0.0, 0, b"")

    def set_pid(self, slot: int, pid: int) -> None:
        _PID.pack_into(self._map, slot * _SLOT.size, pid)

    def begin(self, slot: int, now: float, path: str) -> None:
        offset = slot * _SLOT.size
        _BUSY.pack_into(self._map, offset + 4, 1, now)
        raw = path.encode("latin-1", "replace")[:120]
        self._map[offset + 21 : offset + 141] = raw.ljust(120, b"\0")

    def end(self, slot: int, requests: int) -> None:
        _DONE.pack_into(self._map, slot * _SLOT.size + 4, 0, 0.0, requests)

    def read(self, slot: int) -> WorkerState:
        pid, busy, started, requests, path = _SLOT.unpack_from(self._map, slot * _SLOT.size)
        return WorkerState(pid, bool(busy), started, requests, path.rstrip(b"\0").decode("latin-1"))
