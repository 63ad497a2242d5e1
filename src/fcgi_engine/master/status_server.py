"""The master answers the status page itself, so it answers while every app worker is busy.

Connections reach it two ways:

- passed: a worker read a request for `status_path` and passed the connection over the status
  hand-over socket (fcgi_engine.status_pass); the master replays what the worker consumed into a
  fresh protocol Connection and goes on from there.
- taken: while the listen queue stays non-empty and every worker is busy (the loop decides), the
  master accepts connections itself (Python servers only). It reads each one without blocking
  under params_timeout; a status request it answers, any other connection it hands, with every
  byte it read, to the live workers through the hand-off socket (as a draining worker hands its
  keep-alive connections on), so the request is served as soon as a worker is free.

The answer is read whole first (a body over MAX_BODY closes the connection), then written
without blocking under send_timeout. With FCGI_KEEP_CONN the connection then goes to the
workers through the hand-off socket; otherwise it is closed, everything having been read. The
master never blocks on a peer: every socket is non-blocking and every connection has a deadline;
a hand-off socket that is full is retried each turn, and accepting stops until it has room.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fcgi_engine import metrics
from fcgi_engine.config.address import AllowList
from fcgi_engine.handoff import offer_connection
from fcgi_engine.protocol import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    Limits,
    ProtocolError,
    RequestAborted,
    RequestReady,
    RequestRefused,
    StdinData,
    StdinEnd,
)
from fcgi_engine.status_pass import PassedRequest, receive_status_pass, request_path

log = logging.getLogger("fcgi_engine.master")

# A status request's body is read and dropped; past this much the connection is closed.
MAX_BODY = 64 * 1024
# The most connections the master holds at once (read, answered, or waiting for the hand-off).
MAX_CONNS = 64
# What a taken connection may carry to a worker: the hand-off message must fit one datagram. A
# connection whose head is longer is handed on with what was read so far (a prefix of its
# stream is all the worker needs).
MAX_RAW = 128 * 1024
_READ_SIZE = 65536
# Passed requests taken per wake-up, as with accepts.
_PER_WAKEUP = 16


@dataclass
class StatusConn:
    sock: socket.socket
    proto: Connection
    deadline: float
    taken: bool  # accepted by the master from the listener (else passed by a worker)
    raw: bytearray = field(default_factory=bytearray)  # every byte read, while taken
    request_id: int | None = None
    keep_conn: bool = False
    params: dict[str, str] = field(default_factory=dict)
    body: int = 0
    out: bytes = b""
    # "read": reading a request; "write": sending the answer; "handoff": waiting for room in
    # the hand-off socket (nothing is read meanwhile: the worker reads what follows).
    phase: str = "read"
    watched: int = 0  # the selector events registered


class StatusServer:
    """Everything the master does with FastCGI connections; the loop calls it."""

    def __init__(
        self,
        name: str,
        status_path: str | None,
        snapshot: Callable[[], dict[str, Any]],
        sel: selectors.BaseSelector,
        handoff_send: socket.socket,
        *,
        limits: Limits,
        params_timeout: float,
        send_timeout: float,
        allowed: AllowList | None,
    ) -> None:
        self.name = name
        self.status_path = status_path
        self.snapshot = snapshot
        self.sel = sel
        self.handoff_send = handoff_send
        self.limits = limits
        self.params_timeout = params_timeout
        self.send_timeout = send_timeout
        self.allowed = allowed
        self.conns: dict[int, StatusConn] = {}
        self.answered = 0
        self.handed = 0

    # ------------------------------------------------------------ arrivals

    def receive_passed(self, channel: socket.socket) -> None:
        """Take the requests workers passed on `channel` (non-blocking)."""
        for _ in range(_PER_WAKEUP):
            try:
                passed = receive_status_pass(channel)
            except OSError as exc:
                log.warning("%s: receiving a status request failed: %s", self.name, exc)
                return
            if passed is None:
                return
            self._take_passed(passed)

    def _take_passed(self, passed: PassedRequest) -> None:
        if passed.sock is None:
            log.warning("%s: a status request was lost: no file descriptor left", self.name)
            return
        if len(self.conns) >= MAX_CONNS:
            log.warning("%s: %d status connections open; closing one more", self.name, MAX_CONNS)
            passed.sock.close()
            return
        passed.sock.setblocking(False)
        proto = Connection(self.limits, passed.ended)
        proto.receive_data(passed.replay())
        conn = StatusConn(passed.sock, proto, time.monotonic() + self.params_timeout, taken=False)
        self.conns[conn.sock.fileno()] = conn
        self._advance(conn)

    def room(self) -> bool:
        """Whether the master may take another connection from the listener: below its cap,
        and no connection waits for room in the hand-off socket."""
        return len(self.conns) < MAX_CONNS and not any(
            c.phase == "handoff" for c in self.conns.values()
        )

    def accept_from(self, listener: socket.socket, limit: int) -> int:
        """Accept up to `limit` connections from the non-blocking `listener`; how many."""
        taken = 0
        while taken < limit and self.room():
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    log.warning("%s: the master could not accept: %s", self.name, exc)
                    break
                continue
            if (
                self.allowed is not None
                and isinstance(addr, tuple)
                and not self.allowed.allows(addr[0])
            ):
                log.warning(
                    "%s: connection from %s refused (allowed_addrs: %s)",
                    self.name,
                    addr[0],
                    ", ".join(self.allowed.entries),
                )
                sock.close()
                continue
            taken += 1
            sock.setblocking(False)
            conn = StatusConn(
                sock,
                Connection(self.limits),
                time.monotonic() + self.params_timeout,
                taken=True,
            )
            self.conns[sock.fileno()] = conn
            # Most connections arrive with their request: read it now.
            self.readable(conn)
        return taken

    # ------------------------------------------------------------ reading

    def readable(self, conn: StatusConn) -> None:
        if conn.phase != "read":
            return
        try:
            data = conn.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            self._watch(conn, selectors.EVENT_READ)
            return
        except OSError:
            data = b""
        if conn.taken and conn.request_id is None:
            conn.raw += data
        conn.proto.receive_data(data)
        self._advance(conn)

    def _advance(self, conn: StatusConn) -> None:
        """Carry the connection on with the events its bytes give."""
        while conn.phase == "read":
            try:
                event = conn.proto.next_event()
            except ProtocolError as exc:
                if conn.taken and conn.request_id is None:
                    # Not ours to judge: the worker answers and logs it as it always does.
                    self._hand_raw(conn)
                else:
                    log.warning("%s: status connection closed: %s", self.name, exc)
                    self._close(conn)
                return
            if conn.taken and conn.request_id is None and conn.proto.data_to_send():
                # A management record (GET_VALUES) before any request: the workers answer.
                self._hand_raw(conn)
                return
            if event is NEED_DATA:
                if conn.taken and conn.request_id is None and len(conn.raw) > MAX_RAW:
                    self._hand_raw(conn)
                    return
                self._watch(conn, selectors.EVENT_READ)
                return
            if isinstance(event, RequestReady):
                if conn.taken and (
                    self.status_path is None or request_path(event.params) != self.status_path
                ):
                    self._hand_raw(conn)
                    return
                conn.request_id = event.request_id
                conn.keep_conn = event.keep_conn
                conn.params = event.params
                conn.raw = bytearray()
            elif isinstance(event, RequestRefused):
                if conn.taken:
                    self._hand_raw(conn)
                else:
                    self._close(conn)
                return
            elif isinstance(event, StdinData):
                conn.body += len(event.data)
                if conn.body > MAX_BODY:
                    log.warning(
                        "%s: status request body over %d bytes; connection closed",
                        self.name,
                        MAX_BODY,
                    )
                    self._close(conn)
                    return
            elif isinstance(event, StdinEnd):
                self._answer(conn)
            elif isinstance(event, (RequestAborted, ConnectionClosed)):
                self._close(conn)
                return

    # ------------------------------------------------------------ answering

    def _answer(self, conn: StatusConn) -> None:
        assert conn.request_id is not None
        params = conn.params
        wants = metrics.wants_openmetrics(
            params.get("QUERY_STRING", ""), params.get("HTTP_ACCEPT", "")
        )
        content_type, body = metrics.render(self.snapshot(), wants)
        head = (
            f"Status: 200 OK\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n\r\n"
        ).encode()
        rid = conn.request_id
        conn.out = conn.proto.stdout(rid, head + body) + conn.proto.end_request(rid)
        conn.phase = "write"
        conn.deadline = time.monotonic() + self.send_timeout
        self.answered += 1
        self.writable(conn)

    def writable(self, conn: StatusConn) -> None:
        if conn.phase == "handoff":
            self._hand_on(conn)
            return
        if conn.phase != "write":
            return
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            self._watch(conn, selectors.EVENT_WRITE)
            return
        if conn.keep_conn and not conn.proto.must_close:
            conn.phase = "handoff"
            self._hand_on(conn)
        else:
            self._close(conn)

    # ------------------------------------------------------------ handing on

    def _hand_raw(self, conn: StatusConn) -> None:
        """A taken connection that is not a status request: to the workers, as it arrived."""
        conn.phase = "handoff"
        conn.proto = Connection(self.limits)
        conn.proto.receive_data(bytes(conn.raw))
        conn.raw = bytearray()
        conn.deadline = time.monotonic() + self.params_timeout
        self._hand_on(conn)

    def _hand_on(self, conn: StatusConn) -> None:
        self._watch(conn, 0)
        try:
            done = offer_connection(
                self.handoff_send, conn.sock.fileno(), conn.proto.ended_ids, conn.proto.leftover
            )
        except OSError as exc:
            log.warning("%s: cannot hand a connection to the workers: %s", self.name, exc)
            self._close(conn)
            return
        if done:
            self.handed += 1
            self._close(conn)
        # Else the hand-off socket is full: `tick` tries again.

    # ------------------------------------------------------------ upkeep

    def tick(self, now: float) -> None:
        """Retry hand-offs waiting for room; close connections past their deadline."""
        for conn in list(self.conns.values()):
            if conn.phase == "handoff":
                self._hand_on(conn)
            if conn.sock.fileno() in self.conns and now >= conn.deadline:
                log.warning(
                    "%s: connection closed by the master: %s",
                    self.name,
                    {
                        "read": f"no complete request within {self.params_timeout:g} s",
                        "write": f"the answer not read within {self.send_timeout:g} s",
                        "handoff": "no worker took it in time",
                    }[conn.phase],
                )
                self._close(conn)

    def close_all(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)

    def _watch(self, conn: StatusConn, events: int) -> None:
        if conn.watched == events:
            return
        if conn.watched:
            self.sel.unregister(conn.sock)
        if events:
            self.sel.register(conn.sock, events, ("status-conn", conn))
        conn.watched = events

    def _close(self, conn: StatusConn) -> None:
        self._watch(conn, 0)
        self.conns.pop(conn.sock.fileno(), None)
        conn.sock.close()
