"""Events a Connection yields from the bytes it is fed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


class _NeedData:
    """Sentinel: the connection needs more bytes before it can yield another event."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


@dataclass(frozen=True, slots=True)
class RequestReady:
    """A responder request whose params are complete; its body follows as StdinData/StdinEnd.

    Params are decoded as latin-1, so every byte survives as one character (PEP 3333's
    "bytes as native strings").
    """

    request_id: int
    params: dict[str, str]
    keep_conn: bool


@dataclass(frozen=True, slots=True)
class RequestRefused:
    """A request whose params exceeded the configured limit.

    The connection discards the rest of its records; the server answers it (the request id is
    still open and must be ended with `end_request`).
    """

    request_id: int
    reason: str
    keep_conn: bool


@dataclass(frozen=True, slots=True)
class StdinData:
    request_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StdinEnd:
    request_id: int


@dataclass(frozen=True, slots=True)
class RequestAborted:
    """The web server sent FCGI_ABORT_REQUEST for an open request: end it soon."""

    request_id: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side (receive_data(b"") was called and every buffered byte is used)."""


Event = RequestReady | RequestRefused | StdinData | StdinEnd | RequestAborted | ConnectionClosed
