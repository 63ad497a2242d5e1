"""Handing a connection to the live workers: an idle keep-alive connection from a draining
worker to the next generation, or a connection the master read itself (a status request it
answered, or a request it read while every worker was busy).

The master owns one unix datagram socket pair that outlives every generation. A draining
worker (or the master) sends each connection's descriptor through it (SCM_RIGHTS) with one
message; a live worker receives it and carries on the connection as if it had been accepted
there. The web server never sees the connection close.

Layer 1: the master and the serving side both use it.

The message carries what the FastCGI state of the connection needs to go on: the request ids
the connection already ended (late records of those must still be ignored) and the bytes
received but not yet parsed.
"""

from __future__ import annotations

import array
import socket
from dataclasses import dataclass

# The largest message received: one count byte, up to 255 ids and the unparsed leftover, which
# is at most one receive's worth.
MESSAGE_MAX = 256 * 1024
# How long a draining worker waits for room in the hand-off socket before it gives up on
# handing a connection over (and serves it to the end itself).
SEND_TIMEOUT = 5.0
# Only the most recent ended ids travel: one byte counts them.
_MAX_ENDED = 255


def encode_handoff(ended: list[int], leftover: bytes) -> bytes:
    """The message for a handed-over connection: its ended request ids and unparsed bytes."""
    ended = ended[-_MAX_ENDED:]
    return bytes([len(ended)]) + b"".join(i.to_bytes(2, "big") for i in ended) + leftover


def decode_handoff(message: bytes) -> tuple[list[int], bytes]:
    """The ended request ids and unparsed bytes of encode_handoff's message."""
    if not message:
        return [], b""
    count = message[0]
    ids = [int.from_bytes(message[1 + 2 * i : 3 + 2 * i], "big") for i in range(count)]
    return ids, message[1 + 2 * count :]


def send_connection(channel: socket.socket, fd: int, ended: list[int], leftover: bytes) -> None:
    """Pass the connection `fd` on; the caller closes its own copy once this returns.
    Raises OSError when it could not be sent (the caller keeps serving it)."""
    channel.settimeout(SEND_TIMEOUT)
    socket.send_fds(channel, [encode_handoff(ended, leftover)], [fd])


def offer_connection(channel: socket.socket, fd: int, ended: list[int], leftover: bytes) -> bool:
    """Pass the connection `fd` on without waiting: False when the hand-off socket is full
    (the caller keeps the connection and may try again). Raises OSError on other failures."""
    # sendmsg itself: Python 3.11's socket.send_fds drops its flags (MSG_DONTWAIT), and a full
    # hand-off socket would then block the caller (the master, or a stealer holding its lock).
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    try:
        channel.sendmsg([encode_handoff(ended, leftover)], rights, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class HandedOver:
    """A connection received from a draining worker, or the news that it was lost."""

    sock: socket.socket | None  # None: the kernel could not give us the descriptor
    ended: list[int]
    leftover: bytes


def receive_connection(channel: socket.socket) -> HandedOver | None:
    """Take one handed-over connection from the non-blocking `channel`; None when nothing
    waits. Raises OSError (other than EAGAIN) when receiving failed."""
    try:
        message, fds, flags, _addr = socket.recv_fds(channel, MESSAGE_MAX, 1)
    except (BlockingIOError, InterruptedError):
        return None
    sock = socket.socket(fileno=fds[0]) if fds else None
    if sock is None and not flags & socket.MSG_CTRUNC:
        # An empty datagram without a descriptor: nothing to carry on.
        return None
    ended, leftover = decode_handoff(message)
    return HandedOver(sock, ended, leftover)
