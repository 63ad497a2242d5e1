"""A worker passes a request for `status_path` to the master, which answers it.

The master must answer the status request even when every app worker is busy, so no worker
answers it: the worker that read it passes the connection's descriptor (SCM_RIGHTS) over a unix
datagram socket pair the master owns (it outlives generations and a re-exec of the master,
like the hand-off pair) with one message from which the master rebuilds what the worker
consumed of the connection:

    !HBI header   request id, flags (1: FCGI_KEEP_CONN, 2: the empty STDIN record was seen),
                  length of the params
    params        the request's params, FastCGI name-value encoded
    hand-off      the ended request ids and the unparsed bytes, as fcgi_engine.handoff encodes
                  them for a keep-alive hand-off

The master feeds BEGIN_REQUEST, PARAMS (and the empty STDIN when it was seen) and then the
unparsed bytes to a fresh protocol Connection, so the request goes on as if the master had read
it from the start. Layer 1: the worker sends, the master receives.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from fcgi_engine.handoff import decode_handoff, encode_handoff
from fcgi_engine.protocol import RecordType, Role, encode_record, encode_records
from fcgi_engine.protocol.constants import BEGIN_REQUEST_BODY, FCGI_KEEP_CONN

_HEADER = struct.Struct("!HBI")
_KEEP_CONN = 1
_STDIN_DONE = 2
# The largest message received: the params (nginx sends a few KiB; a request whose params do not
# fit is answered 503 by the worker, as send fails) and at most one receive's worth of leftover.
MESSAGE_MAX = 512 * 1024
# How long a worker waits for room in the socket before it answers 503 itself. The master
# empties it on every turn of its loop, so a full socket means the master is wedged.
PASS_TIMEOUT = 1.0


def encode_status_pass(
    request_id: int,
    keep_conn: bool,
    params: bytes,
    stdin_done: bool,
    ended: list[int],
    leftover: bytes,
) -> bytes:
    flags = (_KEEP_CONN if keep_conn else 0) | (_STDIN_DONE if stdin_done else 0)
    return _HEADER.pack(request_id, flags, len(params)) + params + encode_handoff(ended, leftover)


def pass_status_request(
    channel: socket.socket,
    sock: socket.socket,
    request_id: int,
    keep_conn: bool,
    params: bytes,
    stdin_done: bool,
    ended: list[int],
    leftover: bytes,
) -> None:
    """Pass the connection `sock`, whose request `request_id` asks for the status, to the
    master; the caller then closes its own copy. Raises OSError when it could not be passed
    (the caller answers 503 itself)."""
    message = encode_status_pass(request_id, keep_conn, params, stdin_done, ended, leftover)
    channel.settimeout(PASS_TIMEOUT)
    socket.send_fds(channel, [message], [sock.fileno()])


@dataclass(frozen=True, slots=True)
class PassedRequest:
    """A status request passed by a worker: the connection and the bytes that rebuild it."""

    sock: socket.socket | None  # None: the kernel could not give us the descriptor
    request_id: int
    keep_conn: bool
    params: bytes
    stdin_done: bool
    ended: list[int]
    leftover: bytes

    def replay(self) -> bytes:
        """What a fresh protocol Connection is fed to be where the worker was: the request's
        BEGIN_REQUEST, PARAMS (and empty STDIN when it was seen), then the unparsed bytes."""
        rid = self.request_id
        flags = FCGI_KEEP_CONN if self.keep_conn else 0
        data = encode_record(
            RecordType.BEGIN_REQUEST, rid, BEGIN_REQUEST_BODY.pack(Role.RESPONDER, flags)
        )
        if self.params:
            data += encode_records(RecordType.PARAMS, rid, self.params)
        data += encode_record(RecordType.PARAMS, rid)
        if self.stdin_done:
            data += encode_record(RecordType.STDIN, rid)
        return data + self.leftover


def decode_status_pass(message: bytes, sock: socket.socket | None) -> PassedRequest:
    """The request in `message` (ValueError when it is cut short)."""
    if len(message) < _HEADER.size:
        raise ValueError(f"a status hand-over message of {len(message)} bytes")
    request_id, flags, params_len = _HEADER.unpack_from(message)
    params_end = _HEADER.size + params_len
    if len(message) < params_end:
        raise ValueError("a status hand-over message shorter than its params")
    ended, leftover = decode_handoff(message[params_end:])
    return PassedRequest(
        sock,
        request_id,
        bool(flags & _KEEP_CONN),
        message[_HEADER.size : params_end],
        bool(flags & _STDIN_DONE),
        ended,
        leftover,
    )


def receive_status_pass(channel: socket.socket) -> PassedRequest | None:
    """Take one passed request from the non-blocking `channel`; None when nothing waits or the
    message was garbage (its descriptor is closed). Raises OSError (other than EAGAIN)."""
    try:
        message, fds, _flags, _addr = socket.recv_fds(channel, MESSAGE_MAX, 1, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    sock = socket.socket(fileno=fds[0]) if fds else None
    try:
        return decode_status_pass(message, sock)
    except ValueError:
        if sock is not None:
            sock.close()
        return None


def request_path(params: dict[str, str]) -> str:
    """The URL path a request asked for, from its params as the web server sent them:
    SCRIPT_NAME + PATH_INFO when either is set, else DOCUMENT_URI, else REQUEST_URI without
    its query. What status_path is compared with, by the workers and the master alike."""
    path = params.get("SCRIPT_NAME", "") + params.get("PATH_INFO", "")
    if path:
        return path
    return params.get("DOCUMENT_URI") or params.get("REQUEST_URI", "").partition("?")[0]
