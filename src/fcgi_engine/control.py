"""The manager <-> master contract: JSON lines over a unix socket beside the pidfile (mode 0600).

Each message is a frozen dataclass; this module is the one place that turns them into bytes and
back, so the wire stays what it always was (a new manager talks to an old master, and an old
manager to a new one):

    requests   StatusRequest    {"cmd": "status"}
               RolloutRequest   {"cmd": "graceful"}   answered when the rollout ends
               StopRequest      {"cmd": "stop", "fast": false}   answered when the server stopped
    responses  StatusResponse   {"ok": true, "status": {...}, "pid": N}
               RolloutResponse  {"ok": true, "from": 1, "to": 2, "workers": 4, "boot_seconds": 1.2,
                                 "seconds": 3.4, "pid": N}
                                {"ok": false, "from": 1, "to": 2, "error": "...",
                                 "rolled_back": true, "pid": N}
                                either may add "release_dir" (the real path the generation
                                booted from), "health" ({"path": "/healthz", "status": 200})
                                and (failed) "boot_seconds"; a key whose value is unknown is
                                left out
               StoppedResponse  {"ok": true, "stopped": true, "pid": N}
               ErrorResponse    {"ok": false, "error": "...", "pid": N}

A line that is not one of these raises MessageError saying what is wrong with it. The line codec
(`encode_object`, `decode_object`, LineBuffer) is shared with the generation channel
(fcgi_engine.channel).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar


class ControlError(Exception):
    """The master could not be reached or did not answer."""


class MessageError(ValueError):
    """A line on a channel is not a message of its contract; the text says what is wrong."""


def unhandled(value: NoReturn) -> NoReturn:
    """The `case _:` of an exhaustive match: mypy fails where a member of the union is missed."""
    raise AssertionError(f"unhandled {type(value).__name__}: {value!r}")


# ---------------------------------------------------------------- the line codec


def encode_object(obj: dict[str, Any]) -> bytes:
    """One JSON object as one line."""
    return json.dumps(obj).encode() + b"\n"


def decode_object(line: bytes) -> dict[str, Any]:
    """The JSON object on `line`; MessageError when it is not one."""
    try:
        value = json.loads(line.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"not a JSON line ({exc}): {_excerpt(line)}") from None
    if not isinstance(value, dict):
        raise MessageError(f"a message is a JSON object, not {_excerpt(line)}")
    return value


def _excerpt(line: bytes, limit: int = 80) -> str:
    text = line[:limit].decode("utf-8", "replace")
    return repr(text + ("..." if len(line) > limit else ""))


T = TypeVar("T")


def value_of(obj: dict[str, Any], key: str, kind: type[T], what: str, *, default: Any = ...) -> T:
    """obj[key] checked to be a `kind` (an int is a float, a bool is not an int); MessageError
    naming `what` otherwise. With a default, a missing key (not a wrong one) gives the default."""
    if key not in obj:
        if default is not ...:
            return default
        raise MessageError(f"{what}: {key!r} is missing")
    value = obj[key]
    if isinstance(value, bool) and kind is not bool:
        ok = False
    elif kind is float:
        ok = isinstance(value, (int, float))
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise MessageError(f"{what}: {key!r} must be {kind.__name__}, not {value!r}")
    return float(value) if kind is float else value  # type: ignore[return-value]


def optional_int(obj: dict[str, Any], key: str, what: str) -> int | None:
    if obj.get(key) is None:
        return None
    return value_of(obj, key, int, what)


class LineBuffer:
    """The complete lines of a byte stream, newline removed. A line longer than `limit` is
    dropped (up to its newline) and counted in `dropped`, so a peer cannot grow the buffer."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.limit = limit
        self.rest = b""
        self.dropped = 0
        self.skipping = False  # inside a line that is being dropped

    def feed(self, data: bytes) -> list[bytes]:
        *lines, rest = (self.rest + data).split(b"\n")
        if self.skipping and lines:
            lines.pop(0)  # the end of the dropped line
            self.skipping = False
        lines = [line for line in lines if len(line) <= self.limit or self._drop()]
        if self.skipping:
            rest = b""
        elif len(rest) > self.limit:
            self._drop()
            self.skipping = True
            rest = b""
        self.rest = rest
        return lines

    def _drop(self) -> bool:
        self.dropped += 1
        return False


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class StatusRequest:
    pass


@dataclass(frozen=True)
class RolloutRequest:
    pass


@dataclass(frozen=True)
class StopRequest:
    fast: bool = False


Request = StatusRequest | RolloutRequest | StopRequest


def _request_wire(request: Request) -> dict[str, Any]:
    match request:
        case StatusRequest():
            return {"cmd": "status"}
        case RolloutRequest():
            return {"cmd": "graceful"}
        case StopRequest(fast=fast):
            return {"cmd": "stop", "fast": fast}
        case _:
            unhandled(request)


def decode_request(line: bytes) -> Request:
    obj = decode_object(line)
    cmd = obj.get("cmd")
    if cmd == "status":
        return StatusRequest()
    if cmd == "graceful":
        return RolloutRequest()
    if cmd == "stop":
        return StopRequest(bool(obj.get("fast")))
    if cmd is None:
        raise MessageError(f"a control request names its 'cmd': {_excerpt(line)}")
    raise MessageError(f"unknown command {cmd!r}")


# ---------------------------------------------------------------- responses
#
# `pid` is the answering master's: the policy that decides a response does not know it, the
# loop that sends it fills it in.


@dataclass(frozen=True)
class StatusResponse:
    status: dict[str, Any]  # the snapshot `fcgi-engine status --json` shows
    pid: int | None = None


@dataclass(frozen=True)
class RolloutResponse:
    """How a rollout ended: ok (the new generation serves, the old one is gone) or not (it was
    torn down; `rolled_back` when an older generation still serves)."""

    ok: bool
    from_gen: int | None
    to_gen: int
    workers: int | None = None
    boot_seconds: float | None = None
    seconds: float | None = None  # until the old generation was gone
    error: str = ""
    rolled_back: bool = False
    pid: int | None = None
    # The real path of the server's chdir that the new generation booted from (None: no chdir).
    release_dir: str | None = None
    # The new generation's own health check: {"path": str, "status": int | None}; None without
    # a configured health path.
    health: dict[str, Any] | None = None


@dataclass(frozen=True)
class StoppedResponse:
    pid: int | None = None


@dataclass(frozen=True)
class ErrorResponse:
    error: str
    pid: int | None = None


Response = StatusResponse | RolloutResponse | StoppedResponse | ErrorResponse


def response_wire(response: Response) -> dict[str, Any]:
    """The response as the JSON object it is on the wire (and in `--json` output)."""
    obj: dict[str, Any]
    match response:
        case StatusResponse():
            obj = {"ok": True, "status": response.status}
        case RolloutResponse():
            obj = {"ok": response.ok, "from": response.from_gen, "to": response.to_gen}
            if response.ok:
                for key in ("workers", "boot_seconds", "seconds"):
                    if getattr(response, key) is not None:
                        obj[key] = getattr(response, key)
            else:
                obj.update(error=response.error, rolled_back=response.rolled_back)
                if response.boot_seconds is not None:
                    obj["boot_seconds"] = response.boot_seconds
            for key in ("release_dir", "health"):
                if getattr(response, key) is not None:
                    obj[key] = getattr(response, key)
        case StoppedResponse():
            obj = {"ok": True, "stopped": True}
        case ErrorResponse():
            obj = {"ok": False, "error": response.error}
        case _:
            unhandled(response)
    if response.pid is not None:
        obj["pid"] = response.pid
    return obj


def decode_response(line: bytes) -> Response:
    obj = decode_object(line)
    what = "control response"
    ok = value_of(obj, "ok", bool, what)
    pid = optional_int(obj, "pid", what)
    if "status" in obj:
        return StatusResponse(value_of(obj, "status", dict, what), pid)
    if "stopped" in obj:
        return StoppedResponse(pid)
    if "to" in obj:
        return RolloutResponse(
            ok=ok,
            from_gen=optional_int(obj, "from", what),
            to_gen=value_of(obj, "to", int, what),
            workers=optional_int(obj, "workers", what),
            boot_seconds=value_of(obj, "boot_seconds", float, what, default=None),
            seconds=value_of(obj, "seconds", float, what, default=None),
            error=value_of(obj, "error", str, what, default=""),
            rolled_back=value_of(obj, "rolled_back", bool, what, default=False),
            pid=pid,
            release_dir=(
                value_of(obj, "release_dir", str, what)
                if obj.get("release_dir") is not None
                else None
            ),
            health=value_of(obj, "health", dict, what) if obj.get("health") is not None else None,
        )
    if not ok:
        return ErrorResponse(value_of(obj, "error", str, what, default="unknown error"), pid)
    raise MessageError(f"a control response of no known kind: {_excerpt(line)}")


def encode(message: Request | Response) -> bytes:
    """One request or response as one line."""
    match message:
        case StatusRequest() | RolloutRequest() | StopRequest():
            return encode_object(_request_wire(message))
        case StatusResponse() | RolloutResponse() | StoppedResponse() | ErrorResponse():
            return encode_object(response_wire(message))
        case _:
            unhandled(message)


# ---------------------------------------------------------------- the client side


def _exchange(path: str, line: bytes, timeout: float) -> bytes:
    """Send one line and return the one line that answers it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
            sock.sendall(line)
        except OSError as exc:
            raise ControlError(f"cannot reach the master at {path}: {exc.strerror or exc}") from exc
        buf = b""
        while not buf.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except TimeoutError as exc:
                raise ControlError(f"the master did not answer within {timeout:g} s") from exc
            except OSError as exc:
                raise ControlError(f"the master closed the control connection: {exc}") from exc
            if not chunk:
                raise ControlError("the master closed the control connection without answering")
            buf += chunk
        return buf
    finally:
        sock.close()


_ANSWERS: dict[type[Any], type[Any]] = {
    StatusRequest: StatusResponse,
    RolloutRequest: RolloutResponse,
    StopRequest: StoppedResponse,
}


def ask(path: str, request: Request, timeout: float = 10.0) -> Response:
    """Send one request and wait for its response: the request's own kind or an ErrorResponse.
    ControlError when the master cannot be reached, does not answer in time or answers nonsense."""
    line = _exchange(path, encode(request), timeout)
    try:
        response = decode_response(line)
    except MessageError as exc:
        raise ControlError(f"the master answered something unexpected: {exc}") from None
    if not isinstance(response, (_ANSWERS[type(request)], ErrorResponse)):
        raise ControlError(
            f"the master answered {type(request).__name__} with {type(response).__name__}"
        )
    return response


def call(path: str, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """The raw form of `ask`, for tests and scripts: a request and its response as JSON objects.
    The request is checked as the master would check it (MessageError when it is not one)."""
    request = decode_request(encode_object(message))
    try:
        return decode_object(_exchange(path, encode(request), timeout))
    except MessageError as exc:
        raise ControlError(f"the master answered something unexpected: {exc}") from None
