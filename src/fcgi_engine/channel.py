"""The master <-> generation contract: JSON lines over the socketpair the master makes per
generation (the generation's end is `BootSpec.channel_fd`).

Each message is a frozen dataclass; `encode` and `decode` are the one place that turns them into
bytes and back. The wire is what it always was, since a master re-exec'd after an engine upgrade
adopts generations that speak the old engine's format:

    generation -> master   Ready    {"event": "ready", "pids": [...], "workers": [...]}
                           Failed   {"event": "failed", "error": "..."}
                           Status   {"event": "status", "workers": [...],
                                     "counts": {...}, "restarts": {...}}
    master -> generation   Resize   {"cmd": "nproc", "n": N}

where a worker is {"pid": 12, "state": "idle"|"busy"|"draining", "requests": 3,
"started": 1234.5, "started_at": 1700000000.5, "request": {"method": "GET", "uri": "/x",
"started_at": 1700000001.5} or null}, the shape `fcgi-engine status --json` shows ("started" is
the generation's monotonic clock, the "_at" times are wall clock). A Status's "counts" are the
generation's cumulative request counts ({"by_class": [1xx, 2xx, 3xx, 4xx, 5xx, none],
"buckets": [...], "duration_sum": s}, every worker it ever ran included) and "restarts" its
worker restarts by cause ({"crash": n, "max_requests": n, "timeout": n, "memory": n}). Fields
added since the first version are optional: a message without them decodes with defaults.
End of file on the channel means the peer is gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
    "CurrentRequest",
    "RequestCounts",
    "RESTART_CAUSES",
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


# The shape of the counts: the scoreboard (serving/scoreboard.py) writes them, the master (which
# may not import the serving side) renders them.
# Upper bounds, in seconds, of the request duration histogram (Prometheus' default buckets).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
N_BUCKETS = len(DURATION_BUCKETS) + 1  # the last counts what is above the largest bound
# Status classes counted, in order; "none": no response started, or a status out of range.
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "none")

# Why a generation replaced a worker: it died unasked, it exited after its max_requests, it
# was killed for `timeout` or `heartbeat_timeout`, or it was recycled past max_memory.
RESTART_CAUSES = ("crash", "max_requests", "timeout", "memory")


@dataclass(frozen=True)
class CurrentRequest:
    """The request a worker runs (the oldest, for a worker running several)."""

    method: str
    uri: str
    started_at: float  # wall clock

    def to_wire(self) -> dict[str, Any]:
        return {"method": self.method, "uri": self.uri, "started_at": self.started_at}

    @classmethod
    def from_wire(cls, obj: object) -> CurrentRequest | None:
        if not isinstance(obj, dict):
            return None
        what = "request"
        return cls(
            method=value_of(obj, "method", str, what, default=""),
            uri=value_of(obj, "uri", str, what, default=""),
            started_at=value_of(obj, "started_at", float, what, default=0.0),
        )


@dataclass(frozen=True)
class WorkerInfo:
    pid: int
    state: str  # "idle" | "busy" | "draining"
    requests: int
    started: float  # time.monotonic() in the generation when the worker was forked
    started_at: float = 0.0  # the same moment, wall clock (0: not known)
    request: CurrentRequest | None = None
    in_flight: int = 0  # requests it runs now (a threaded or ASGI worker runs several)

    def to_wire(self) -> dict[str, Any]:
        # The fields added since the first version only when set: the first version's bytes
        # stay what they were.
        wire: dict[str, Any] = {
            "pid": self.pid,
            "state": self.state,
            "requests": self.requests,
            "started": self.started,
        }
        if self.started_at:
            wire["started_at"] = self.started_at
        if self.request is not None:
            wire["request"] = self.request.to_wire()
        if self.in_flight:
            wire["in_flight"] = self.in_flight
        return wire

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
            started_at=value_of(obj, "started_at", float, what, default=0.0),
            request=CurrentRequest.from_wire(obj.get("request")),
            in_flight=value_of(obj, "in_flight", int, what, default=0),
        )


def _counts(value: object, size: int, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in value
    ):
        raise MessageError(f"{what} must be a list of ints, not {value!r:.80}")
    # A peer with another number of buckets or classes: pad or cut, never fail the status.
    return tuple(value[:size]) + (0,) * max(0, size - len(value))


@dataclass(frozen=True)
class RequestCounts:
    """Requests ended, cumulative: by status class (1xx..5xx, none), by duration bucket (not
    cumulative; the last is above the largest bound) and the sum of their durations."""

    by_class: tuple[int, ...]
    buckets: tuple[int, ...]
    duration_sum: float = 0.0

    @classmethod
    def zero(cls, classes: int, buckets: int) -> RequestCounts:
        return cls((0,) * classes, (0,) * buckets, 0.0)

    def plus(self, other: RequestCounts) -> RequestCounts:
        return RequestCounts(
            tuple(a + b for a, b in zip(self.by_class, other.by_class, strict=False)),
            tuple(a + b for a, b in zip(self.buckets, other.buckets, strict=False)),
            self.duration_sum + other.duration_sum,
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "by_class": list(self.by_class),
            "buckets": list(self.buckets),
            "duration_sum": self.duration_sum,
        }

    @classmethod
    def from_wire(cls, obj: object, classes: int, buckets: int) -> RequestCounts:
        if not isinstance(obj, dict):
            raise MessageError(f"'counts' must be a JSON object, not {obj!r:.80}")
        return cls(
            _counts(obj.get("by_class", []), classes, "counts: 'by_class'"),
            _counts(obj.get("buckets", []), buckets, "counts: 'buckets'"),
            value_of(obj, "duration_sum", float, "counts", default=0.0),
        )


def workers_from_wire(value: object) -> list[WorkerInfo]:
    if not isinstance(value, list):
        raise MessageError(f"'workers' must be a list, not {value!r}")
    return [WorkerInfo.from_wire(w) for w in value]


@dataclass(frozen=True)
class HealthResult:
    """The generation's own health check: the path asked and the status it answered (None:
    no answer, e.g. the worker died or timed out)."""

    path: str
    status: int | None

    def to_wire(self) -> dict[str, Any]:
        return {"path": self.path, "status": self.status}

    @classmethod
    def from_wire(cls, value: object) -> HealthResult | None:
        if value is None:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("path"), str):
            raise MessageError(f"'health' must be an object with a 'path', not {value!r:.80}")
        status = value.get("status")
        if status is not None and (not isinstance(status, int) or isinstance(status, bool)):
            raise MessageError(f"health: 'status' must be an int or null, not {status!r:.80}")
        return cls(value["path"], status)


@dataclass(frozen=True)
class Ready:
    """Every worker answers (and the health check passed): the generation may serve."""

    pids: list[int]
    workers: list[WorkerInfo]
    health: HealthResult | None = None  # None: no health path is configured


@dataclass(frozen=True)
class Failed:
    """The generation cannot serve; `error` is shown to whoever asked for the rollout."""

    error: str
    health: HealthResult | None = None  # the check that failed it, when one did


@dataclass(frozen=True)
class Status:
    """The workers now, and the generation's cumulative counts, sent periodically and once more
    as the generation exits."""

    workers: list[WorkerInfo]
    counts: RequestCounts | None = None  # None: the kind counts no requests (a `command:`)
    restarts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Resize:
    """Run `nproc` workers (a count, where TTIN/TTOU signals would coalesce)."""

    nproc: int


@dataclass(frozen=True)
class Stop:
    """The server stops (sent just before the SIGTERM that drains the generation).
    `serve_backlog`: the master made the listener refuse new connections, so the workers accept
    what is queued until the queue stays empty, then close their copies of the listener;
    otherwise (a socket someone else holds, as systemd does) they stop accepting at once and
    leave the queue to whoever serves next. A generation that does not know this message drains
    on the SIGTERM alone, as before."""

    serve_backlog: bool


Message = Ready | Failed | Status | Resize | Stop


def encode(message: Message) -> bytes:
    """One message as one JSON line."""
    obj: dict[str, Any]
    match message:
        case Ready(pids=pids, workers=workers, health=health):
            obj = {"event": "ready", "pids": pids, "workers": [w.to_wire() for w in workers]}
            if health is not None:
                obj["health"] = health.to_wire()
        case Failed(error=error, health=health):
            obj = {"event": "failed", "error": error}
            if health is not None:
                obj["health"] = health.to_wire()
        case Status(workers=workers, counts=counts, restarts=restarts):
            obj = {"event": "status", "workers": [w.to_wire() for w in workers]}
            if counts is not None:
                obj["counts"] = counts.to_wire()
            if restarts:
                obj["restarts"] = restarts
        case Resize(nproc=nproc):
            obj = {"cmd": "nproc", "n": nproc}
        case Stop(serve_backlog=serve_backlog):
            obj = {"cmd": "stop", "serve_backlog": serve_backlog}
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
        return Ready(
            pids,
            workers_from_wire(obj.get("workers", [])),
            HealthResult.from_wire(obj.get("health")),
        )
    if event == "failed":
        return Failed(
            value_of(obj, "error", str, "failed", default=""),
            HealthResult.from_wire(obj.get("health")),
        )
    if event == "status":
        counts = None
        if obj.get("counts") is not None:
            counts = RequestCounts.from_wire(obj["counts"], len(STATUS_CLASSES), N_BUCKETS)
        restarts = value_of(obj, "restarts", dict, "status", default={})
        return Status(
            workers_from_wire(value_of(obj, "workers", list, "status")),
            counts,
            {k: v for k, v in restarts.items() if isinstance(v, int) and not isinstance(v, bool)},
        )
    if event is not None:
        raise MessageError(f"unknown event {event!r}")
    cmd = obj.get("cmd")
    if cmd == "nproc":
        return Resize(value_of(obj, "n", int, "nproc"))
    if cmd == "stop":
        return Stop(value_of(obj, "serve_backlog", bool, "stop", default=False))
    if cmd is not None:
        raise MessageError(f"unknown command {cmd!r}")
    raise MessageError(f"a channel message names its 'event' or 'cmd': {obj!r:.80}")
