"""The master answers the status page itself, so it answers while every app worker is busy.

Connections reach it two ways:

- passed: a worker read a request for `status_path` and passed the connection over the status
  hand-over socket (fcgi_engine.status_pass); the master replays what the worker consumed into a
  fresh protocol Connection and goes on from there.
- taken: while the listen queue stays non-empty and every worker is busy (the loop decides), the
  master accepts connections itself (Python servers only) and looks at each one's first bytes
  without consuming them (MSG_PEEK). A status request it reads and answers; any other
  connection goes to the live workers through the hand-off socket untouched, as if it had come
  from the backlog, so the request is served as soon as a worker is free. The master never reads
  an app request, so it never holds one to a deadline: a slow peer is the workers' business, as
  always, and a connection waiting for room in the hand-off socket waits as it would have in
  the backlog (and is carried over a USR2 re-exec).

The answer is read whole first (a body over MAX_BODY closes the connection), then written
without blocking under send_timeout. With FCGI_KEEP_CONN the connection then goes to the
workers through the hand-off socket; otherwise it is closed, everything having been read. The
master never blocks on a peer: every socket is non-blocking and every connection has a deadline;
a hand-off socket that is full is retried each turn, and accepting stops until it has room.
"""

from __future__ import annotations

import errno
import logging
import math
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
# The most status requests passed by workers that the master holds at once.
MAX_CONNS = 64
# The most connections the master takes from the listener at once (looked at, or waiting for
# room in the hand-off socket).
MAX_TAKEN = 64
# How much of a taken connection the master looks at, and for how long, before it hands the
# connection on untouched: a web server sends a status request's records in one go.
PEEK_MAX = 64 * 1024
PEEK_WAIT = 0.25
_READ_SIZE = 65536
# Passed requests taken per wake-up, as with accepts.
_PER_WAKEUP = 16


@dataclass
class StatusConn:
    sock: socket.socket
    proto: Connection
    deadline: float
    taken: bool  # accepted by the master from the listener (else passed by a worker)
    request_id: int | None = None
    keep_conn: bool = False
    params: dict[str, str] = field(default_factory=dict)
    body: int = 0
    out: bytes = b""
    # "peek": a taken connection whose first bytes are looked at, not read; "read": reading a
    # status request; "write": sending the answer; "handoff": waiting for room in the hand-off
    # socket (nothing is read meanwhile: the worker reads what follows).
    phase: str = "read"
    untouched: bool = False  # nothing of it was read: it may wait in the master for ever
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
        if sum(1 for c in self.conns.values() if not c.taken) >= MAX_CONNS:
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
        taken = [c for c in self.conns.values() if c.taken]
        return len(taken) < MAX_TAKEN and not any(c.phase == "handoff" for c in taken)

    def held(self) -> int:
        """Connections taken from the listener that wait in the master for a worker."""
        return sum(1 for c in self.conns.values() if c.untouched)

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
                time.monotonic() + PEEK_WAIT,
                taken=True,
                phase="peek",
                untouched=True,
            )
            self.conns[sock.fileno()] = conn
            # Most connections arrive with their request: look at it now.
            self._peek(conn)
        return taken

    def adopt_untouched(self, sock: socket.socket) -> None:
        """A taken connection carried over a re-exec: to the workers as soon as there is room."""
        sock.setblocking(False)
        conn = StatusConn(
            sock, Connection(self.limits), math.inf, taken=True, phase="handoff", untouched=True
        )
        self.conns[sock.fileno()] = conn
        self._hand_on(conn)

    def release_untouched(self) -> list[socket.socket]:
        """The taken connections nothing was read from, no longer the master's to watch (for a
        re-exec to carry over; the new image adopts them)."""
        out = []
        for conn in list(self.conns.values()):
            if conn.untouched:
                self._watch(conn, 0)
                del self.conns[conn.sock.fileno()]
                out.append(conn.sock)
        return out

    # ------------------------------------------------------------ looking

    def _peek(self, conn: StatusConn) -> None:
        """Look at a taken connection's first bytes without consuming them: a status request is
        then read and answered; any other connection goes to the workers as it came."""
        try:
            data: bytes | None = conn.sock.recv(PEEK_MAX, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            data = b""
        if data == b"":
            # Closed (or reset) before it sent anything: the workers would only close it too.
            self._close(conn)
            return
        verdict = self._is_status(data) if data is not None else None
        if verdict:
            conn.phase = "read"
            conn.untouched = False
            conn.deadline = time.monotonic() + self.params_timeout
            self.readable(conn)
        elif verdict is False or time.monotonic() >= conn.deadline or len(data or b"") >= PEEK_MAX:
            conn.phase = "handoff"
            conn.deadline = math.inf
            self._hand_on(conn)
        elif data is None:
            # Nothing yet: the first bytes make it readable.
            self._watch(conn, selectors.EVENT_READ)
        else:
            # Part of a request: unread bytes keep a socket readable, so watching it would spin;
            # `tick` looks again.
            self._watch(conn, 0)

    def _is_status(self, data: bytes) -> bool | None:
        """Whether the bytes a connection starts with are a request for status_path (None: not
        complete enough to tell)."""
        proto = Connection(self.limits)
        proto.receive_data(data)
        try:
            event = proto.next_event()
        except ProtocolError:
            return False  # not ours to judge: the worker answers and logs it as always
        if proto.data_to_send():
            return False  # a management record (GET_VALUES): the workers answer
        if event is NEED_DATA:
            return None
        if isinstance(event, RequestReady):
            return self.status_path is not None and request_path(event.params) == self.status_path
        return False

    # ------------------------------------------------------------ reading

    def readable(self, conn: StatusConn) -> None:
        if conn.phase == "peek":
            self._peek(conn)
            return
        if conn.phase != "read":
            return
        try:
            data = conn.sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            self._watch(conn, selectors.EVENT_READ)
            return
        except OSError:
            data = b""
        conn.proto.receive_data(data)
        self._advance(conn)

    def _advance(self, conn: StatusConn) -> None:
        """Carry the connection on with the events its bytes give."""
        while conn.phase == "read":
            try:
                event = conn.proto.next_event()
            except ProtocolError as exc:
                log.warning("%s: status connection closed: %s", self.name, exc)
                self._close(conn)
                return
            if event is NEED_DATA:
                self._watch(conn, selectors.EVENT_READ)
                return
            if isinstance(event, RequestReady):
                conn.request_id = event.request_id
                conn.keep_conn = event.keep_conn
                conn.params = event.params
            elif isinstance(event, RequestRefused):
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
            # Idle now: it waits for a worker like any kept-alive connection.
            conn.phase = "handoff"
            conn.deadline = math.inf
            self._hand_on(conn)
        else:
            self._close(conn)

    # ------------------------------------------------------------ handing on

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
        """Look again at taken connections, retry hand-offs waiting for room, and close the
        connections past their deadline (never one nothing was read from: it waits for a
        worker as it would have in the backlog)."""
        for conn in list(self.conns.values()):
            if conn.phase == "peek":
                self._peek(conn)
            elif conn.phase == "handoff":
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
