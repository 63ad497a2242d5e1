"""The master <-> generation contract: JSON lines over the socketpair the master makes per
generation (the generation's end is `BootSpec.channel_fd`).

Each message is a frozen dataclass; `encode` and `decode` are the one place that turns them into
bytes and back. The wire is what it always was, since a master re-exec'd after an engine upgrade
adopts generations that speak the old engine's format:

    generation -> master   Ready    {"event": "ready", "pids": [...], "workers": [...]}
                           Failed   {"event": "failed", "error": "..."}
                           Status   {"event": "status", "workers": [...]}
    master -> generation   Resize   {"cmd": "nproc", "n": N}

where a worker is {"pid": 12, "state": "idle"|"busy", "requests": 3, "started": 1234.5}, the
shape `fcgi-engine status --json` shows. End of file on the channel means the peer is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fcgi_engine.control import (
    LineBuffer,
    MessageError,
    decode_object,
    encode_object,
    unhandled,
    value_of,
)

__all__ = [
    "WorkerInfo",
    "Ready",
    "Failed",
    "Status",
    "Resize",
    "Message",
    "MessageError",
    "encode",
    "decode",
    "LineBuffer",
]


@dataclass(frozen=True)
class WorkerInfo:
    pid: int
    state: str  # "idle" | "busy"
    requests: int
    started: float  # time.monotonic() in the generation when the worker was forked

    def to_wire(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "state": self.state,
            "requests": self.requests,
            "started": self.started,
        }

    @classmethod
    def from_wire(cls, obj: object) -> WorkerInfo:
        if not isinstance(obj, dict):
            raise MessageError(f"a worker is a JSON object, not {obj!r}")
        what = "worker"
        return cls(
            pid=value_of(obj, "pid", int, what),
            state=value_of(obj, "state", str, what),
            requests=value_of(obj, "requests", int, what, default=0),
            started=value_of(obj, "started", float, what, default=0.0),
        )


def workers_from_wire(value: object) -> list[WorkerInfo]:
    if not isinstance(value, list):
        raise MessageError(f"'workers' must be a list, not {value!r}")
    return [WorkerInfo.from_wire(w) for w in value]


@dataclass(frozen=True)
class Ready:
    """Every worker answers (and the health check passed): the generation may serve."""

    pids: list[int]
    workers: list[WorkerInfo]


@dataclass(frozen=True)
class Failed:
    """The generation cannot serve; `error` is shown to whoever asked for the rollout."""

    error: str


@dataclass(frozen=True)
class Status:
    """The workers now, sent periodically."""

    workers: list[WorkerInfo]


@dataclass(frozen=True)
class Resize:
    """Run `nproc` workers (a count, where TTIN/TTOU signals would coalesce)."""

    nproc: int


Message = Ready | Failed | Status | Resize


def encode(message: Message) -> bytes:
    """One message as one JSON line."""
    obj: dict[str, Any]
    match message:
        case Ready(pids=pids, workers=workers):
            obj = {"event": "ready", "pids": pids, "workers": [w.to_wire() for w in workers]}
        case Failed(error=error):
            obj = {"event": "failed", "error": error}
        case Status(workers=workers):
            obj = {"event": "status", "workers": [w.to_wire() for w in workers]}
        case Resize(nproc=nproc):
            obj = {"cmd": "nproc", "n": nproc}
        case _:
            unhandled(message)
    return encode_object(obj)


def decode(line: bytes) -> Message:
    """The message on `line` (without or with its newline); MessageError saying what is wrong."""
    obj = decode_object(line)
    event = obj.get("event")
    if event == "ready":
        pids = value_of(obj, "pids", list, "ready", default=[])
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in pids):
            raise MessageError(f"ready: 'pids' must be a list of ints, not {pids!r}")
        return Ready(pids, workers_from_wire(obj.get("workers", [])))
    if event == "failed":
        return Failed(value_of(obj, "error", str, "failed", default=""))
    if event == "status":
        return Status(workers_from_wire(value_of(obj, "workers", list, "status")))
    if event is not None:
        raise MessageError(f"unknown event {event!r}")
    cmd = obj.get("cmd")
    if cmd == "nproc":
        return Resize(value_of(obj, "n", int, "nproc"))
    if cmd is not None:
        raise MessageError(f"unknown command {cmd!r}")
    raise MessageError(f"a channel message names its 'event' or 'cmd': {obj!r:.80}")
