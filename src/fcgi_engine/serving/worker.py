"""The worker: one process, one request at a time (or `threads` at once), many connections.

It watches the shared listening socket, its own connections and (when a generation hands
connections over) the hand-off socket in one epoll set. Every connection is read without
blocking until its request is complete (params, then the whole body, spooled to a file when
large), so no peer can hold the worker by trickling bytes: a connection only costs a file
descriptor while it waits, and deadlines bound that wait (params, body, idle keep-alive). Only a
complete request reaches the app.

A worker of a generation that is still proving itself neither accepts nor takes handed-over
connections: it serves only its private proof connection until the generation tells it to go
live (SIGUSR2). Draining stops accepting, finishes the request in hand, and passes every idle
keep-alive connection to the next generation through the hand-off socket instead of closing it
under the web server's feet. A stop whose listener refuses new connections (worker_base's
_serve_backlog) first accepts the listen queue dry, one connection at a time as it has room,
then closes its copy of the listener.

Work stealing (stealing.py): a request sent on a kept-alive connection of a worker that is
inside a long app call would wait for it while a sibling may be idle. Past STEAL_AFTER (20 ms)
in one call, a helper thread hands every other connection with a request waiting to the
hand-off socket, from which any live worker takes it (an idle one at once); a waiting status
request goes to the master instead. The threaded loop does the same itself while every thread
stays busy. A loop that polls after such a call takes the oldest first: the listen queue, then
the hand-off socket, then its own connections.

With `threads: N` > 1 the loop stays the only reader of connections; a complete request goes to
one of N threads (each with its own response sink) and its connection leaves the epoll set
until the thread hands it back (the `done` queue and a poke of the wake-up pipe); then the loop
resumes keep-alive or closes it, as after an inline request. An idle connection never holds a
thread. With all N busy, the loop reads no connection and accepts nothing (requests wait in
their sockets and the backlog) but keeps its deadlines and heartbeat. With N == 1 nothing of
this exists: the app runs inline, as it always did.

Beside it: handoff.py (the hand-off message and its SCM_RIGHTS transfer), access_log.py (the
access log), wsgi.py (one request through the app), body.py and environ.py (what the app is
given), scoreboard.py (what the generation sees of its workers).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fcgi_engine.handoff import offer_connection, send_connection
from fcgi_engine.protocol import (
    NEED_DATA,
    Connection,
    ConnectionClosed,
    ProtocolError,
    RequestAborted,
    RequestReady,
    RequestRefused,
    StdinData,
    StdinEnd,
)
from fcgi_engine.serving.access_log import AccessLog, request_uri
from fcgi_engine.serving.body import (
    EMPTY_BODY,
    ClientDisconnected,
    EndNotDelivered,
    InputStream,
    SpooledBody,
)
from fcgi_engine.serving.environ import build_environ
from fcgi_engine.serving.loader import WSGIApp
from fcgi_engine.serving.scoreboard import InFlight
from fcgi_engine.serving.stealing import STEAL_AFTER, Stealer
from fcgi_engine.serving.worker_base import (
    SWEEP_SECONDS,
    Phase,
    WorkerBase,
)
from fcgi_engine.serving.wsgi import (
    ErrorStream,
    FileWrapper,
    ResponseCutOff,
    run_app,
    simple_response,
)
from fcgi_engine.system.wakeup import WakeupPipe

log = logging.getLogger("fcgi_engine.worker")

RECV_SIZE = 256 * 1024
# How long a closing connection may keep draining a request body nobody will read: closing on
# unread data resets the connection, and the web server could lose the answer or say 502.
LINGER_SECONDS = 2.0
# On a plain stop (TERM), how long an idle keep-alive connection stays open for a request nginx
# may already be sending on it; closing it at once would reset that request (nginx resends a
# GET elsewhere, never a POST).
STOP_IDLE_GRACE = 1.0
_EPOLLEXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 0)
# The most unparsed bytes a connection may carry when it is given away to another worker (a
# hand-off message is received into a 256 KiB buffer; nginx sends a request at a time).
STEAL_LEFTOVER_MAX = 64 * 1024


# The request path compares phases several times per request, and on Python 3.11 each
# `Phase.X` is a lookup through the enum's metaclass (about 60 ns); module names cost nothing.
_NONE = Phase.NONE
_PARAMS = Phase.PARAMS
_BODY = Phase.BODY
_IDLE = Phase.IDLE
_LINGER = Phase.LINGER
_PRIVATE = Phase.PRIVATE
_BUSY = Phase.BUSY


class _Conn:
    __slots__ = (
        "sock",
        "fd",
        "proto",
        "registered",
        "phase",
        "deadline",
        "request",
        "body",
        "peer",
        "resume_phase",
    )

    def __init__(self, sock: socket.socket, proto: Connection, peer: Any) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.proto = proto
        self.registered = False
        self.phase = _NONE
        self.deadline = 0.0
        # The request whose body is being received, and that body so far.
        self.request: RequestReady | None = None
        self.body: SpooledBody | None = None
        self.peer = peer
        # A threaded request's connection: the phase to return to (PRIVATE or NONE).
        self.resume_phase = _NONE


def send_all(sock: socket.socket, data: bytes | memoryview, timeout: float) -> None:
    """Send everything on a non-blocking socket, waiting at most `timeout` for progress."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        raise ClientDisconnected(f"send failed: {exc}") from exc
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            _wait(sock, select.POLLOUT, timeout)
            continue
        except OSError as exc:
            raise ClientDisconnected(f"send failed: {exc}") from exc
        view = view[sent:]


def send_last(sock: socket.socket, data: bytes, timeout: float) -> None:
    """Send the end of a response with the end of the connection right behind it: over TCP in
    one segment (corked), so nginx reads END_REQUEST and the FIN together and never puts the
    connection back in its keep-alive cache (where a request could be sent on it as it
    closes). Raises ClientDisconnected as send_all does."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    except OSError:
        pass  # a unix socket: the FIN follows at once anyway
    send_all(sock, data, timeout)
    try:
        sock.shutdown(socket.SHUT_WR)  # also sends what the cork held
    except OSError:
        pass


def _bytes_waiting(sock: socket.socket) -> bool:
    """Whether the peer has sent anything (or closed) that we have not read yet."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:  # BlockingIOError: nothing; any other error: the loop's close will do
        return False
    return True  # bytes, or the peer's close: the loop reads either


def _wait(sock: socket.socket, flag: int, timeout: float) -> None:
    poller = select.poll()
    poller.register(sock, flag)
    if not poller.poll(timeout * 1000):
        raise ClientDisconnected(f"the web server read nothing for {timeout:g} s (send_timeout)")


def describe_peer(sock: socket.socket, address: Any) -> str:
    """Who is at the other end: HOST:PORT for TCP, the process for a unix socket."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        return f"unix peer pid {pid} uid {uid}"
    except OSError:
        return "unix peer"


class Worker(WorkerBase[_Conn, WSGIApp]):
    def _on_term(self) -> None:
        # A plain stop: from now on each response ends its keep-alive connection with it.
        self._ending[0] = True
        super()._on_term()

    def _setup(self) -> None:
        self.errors = ErrorStream(self.error_stream)
        # Connections with a whole request already buffered: served before waiting again.
        self.pending: dict[int, _Conn] = {}
        self._drain_started = False
        self._now = time.monotonic()
        self._epoll = select.epoll()
        self._wakeup = WakeupPipe()
        # Every sink notes the response's status (the scoreboard counts it); with an access
        # log it also counts the body's bytes and writes the line, without one nothing does.
        self._ending = [False]  # shared by this worker's sinks: see _ResponseSink.ending
        self._logged_sink = (
            _LoggedResponseSink(self.settings.send_timeout, self.access_log, self._ending)
            if self.access_log is not None
            else None
        )
        self._sink = self._logged_sink or _ResponseSink(self.settings.send_timeout, self._ending)
        self._threads: _Threads | None = None
        # The slowlog's key for an inline request: the thread running the loop (run() sets it).
        self._ident = threading.get_ident()
        if self.settings.threads > 1:
            self._threads = _Threads(self.settings.threads, self._new_sink, self._wakeup)
            self._threads.run = self._run_threaded
            self._in_flight = InFlight(self.scoreboard, self.slot)
            # The instance attribute shadows the inline method: the N == 1 path is untouched.
            self._handle_complete = self._dispatch  # type: ignore[method-assign]
        # Work stealing (stealing.py): requests waiting on this worker's other connections
        # while its one thread is in a long app call go to the siblings. The threaded loop
        # gives them away itself when every thread stays busy.
        self._stealer: Stealer | None = None
        self._steal_armed = False  # the stealer's thread is awake (it sleeps while disarmed)
        self._repoll = False  # the stealer gave connections away during the last app call
        self._oldest_first = False  # so the next poll's events are served oldest first
        self._app_conn: _Conn | None = None  # the connection whose request is in the app
        self.given_away = 0  # connections with a waiting request handed to other workers
        if self.handoff_send is not None and self.handoff_recv is not None and not self._threads:
            self._stealer = Stealer(self._give_away_waiting)

    def _new_sink(self) -> _ResponseSink:
        timeout = self.settings.send_timeout
        if self.access_log is not None:
            return _LoggedResponseSink(timeout, self.access_log, self._ending)
        return _ResponseSink(timeout, self._ending)

    def close(self) -> None:
        """Release the epoll set, the wake-up pipe and the threads. A worker process never needs
        this (it exits after run()); a worker run inside another process, as in the tests, does."""
        if self._threads is not None:
            self._threads.stop()
        if self._stealer is not None:
            self._stealer.stop()
        if self.slowlog is not None:
            self.slowlog.stop()
        self._epoll.close()
        self._wakeup.close()

    # ------------------------------------------------------------ signals

    def install_signals(self) -> None:
        # A signal wakes the epoll wait through the wake-up pipe; the handlers only set flags.
        self._wakeup.install()
        super().install_signals()

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        ep = self._epoll
        self.listener.setblocking(False)
        if self.handoff_recv is not None:
            # Shared by every worker of every generation: never block on it.
            self.handoff_recv.setblocking(False)
        ep.register(self._wakeup.read_fd, select.EPOLLIN)
        if self.private is not None:
            self._adopt(self.private, b"", phase=_PRIVATE)
        listen_fd = self.listener.fileno()
        handoff_fd = self.handoff_recv.fileno() if self.handoff_recv is not None else -1
        wakeup_fd = self._wakeup.read_fd
        threads = self._threads
        if threads is not None:
            threads.start()
        self._ident = threading.get_ident()
        if self.slowlog is not None:
            self.slowlog.start()
        stealer = self._stealer
        if stealer is not None:
            stealer.start()
        # Whether waiting requests may go to other workers: threaded, after STEAL_AFTER with
        # every thread busy; inline, the stealer's thread is woken (armed) for it.
        can_give_away = self.handoff_send is not None and self.handoff_recv is not None
        next_sweep = 0.0
        while True:
            if self._draining and not self._drain_started:
                self._drain_started = True
                self._release_idle()
            backlog_wait = None
            if self._serving_backlog:
                room = (
                    len(self.conns) < self.settings.worker_connections
                    and not (threads is not None and threads.full)
                    and self._now >= self._accept_paused_until
                )
                backlog_wait = self._serve_backlog(time.monotonic(), room)
                if not self._serving_backlog:
                    listen_fd = -1  # closed: its number may come back as a connection's
            if self._draining and not self.conns and not self._serving_backlog:
                return
            self._update_listening()
            if (
                stealer is not None
                and self._steal_armed
                and (len(self.conns) < 2 or not self._listening)
            ):
                # Nothing can wait behind an app call: let the stealer's thread sleep (_handle
                # wakes it when an app call starts with another connection open).
                stealer.arm(False)
                self._steal_armed = False
            wait = 0 if self.pending else SWEEP_SECONDS
            if backlog_wait is not None:
                wait = min(wait, backlog_wait)
            try:
                if threads is not None and threads.full:
                    # Every thread busy: wait for one to finish (or a signal), read nothing;
                    # busy that long, give the requests waiting on other connections away.
                    if can_give_away and self._listening:
                        events = threads.wait(STEAL_AFTER)
                        if not events and threads.full:
                            self._give_away_waiting()
                    else:
                        events = threads.wait(SWEEP_SECONDS)
                else:
                    events = ep.poll(wait)
            except InterruptedError:
                continue
            self._now = now = time.monotonic()
            saturated = False
            if threads is not None:
                self._collect(threads)
                saturated = threads.full
            if self.pending and not saturated:
                ready = list(self.pending.values())
                self.pending.clear()
                for conn in ready:
                    # `is`: a connection given away meanwhile left its number to another.
                    if self.conns.get(conn.fd) is conn:
                        self._serve(conn)
            if now >= next_sweep:
                next_sweep = now + SWEEP_SECONDS
                self._sweep(now)
            if self._oldest_first:
                self._oldest_first = False
                # After a long app call (the stealer ran), oldest first, about: the listen
                # queue (new connections, whose requests waited longest in a burst), then the
                # hand-off socket (connections given away, in the order given), then requests
                # that reached this worker's own connections meanwhile (bench/keepalive.py:
                # p99 with keep-alive 6.2 s -> 2.0 s, RESULTS.md issue 11 item 6).
                if len(events) > 1:
                    events.sort(
                        key=lambda event: 0 if event[0] == listen_fd else event[0] != handoff_fd
                    )
            for fd, _mask in events:
                if fd == listen_fd:
                    if self._listening:
                        self._accept()
                elif fd == wakeup_fd:
                    self._wakeup.drain()
                elif fd == handoff_fd:
                    if self._listening:
                        self._receive_handoff()
                else:
                    watched = self.conns.get(fd)
                    if watched is not None and watched.phase != _BUSY:
                        self._serve(watched)
                if self._draining or self._repoll:
                    # After an app call long enough for the stealer the rest of `events` is
                    # stale (what it names was given away, the order no longer oldest first).
                    self._oldest_first = self._repoll
                    self._repoll = False
                    break
            if (
                self.options.max_requests
                and self.requests >= self.options.max_requests
                and not self._draining
            ):
                log.info("worker %d: served %d requests, recycling", os.getpid(), self.requests)
                self._draining = True
                self._handoff_on_drain = self.handoff_send is not None

    def _sweep(self, now: float) -> None:
        """Housekeeping a few times a second: heartbeat, logs, the parent's life, deadlines."""
        self._housekeeping(now)
        min_rate = self.settings.body_min_rate
        for conn in list(self.conns.values()):
            deadline = conn.deadline
            if not deadline or now <= deadline:
                continue
            if conn.phase == _BODY and min_rate and conn.body is not None:
                # A body that keeps coming at a decent rate earns more time.
                if now <= deadline + conn.body.size / min_rate:
                    continue
            if conn.fd in self.conns:
                self._expire(conn)

    def _update_listening(self) -> None:
        """Watch the shared socket (and the hand-off socket) only while this worker may take new
        connections: proven, not draining, under its connection cap, not out of descriptors."""
        want = (
            self._live
            and not self._draining
            and len(self.conns) < self.settings.worker_connections
            and self._now >= self._accept_paused_until
        )
        if want == self._listening:
            return
        self._listening = want
        fds = [self.listener.fileno()]
        if self.handoff_recv is not None:
            fds.append(self.handoff_recv.fileno())
        for fd in fds:
            if want:
                self._epoll.register(fd, select.EPOLLIN | _EPOLLEXCLUSIVE)
            else:
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass

    def _adopt(
        self,
        sock: socket.socket,
        leftover: bytes,
        ended: Iterable[int] = (),
        *,
        peer: Any = None,
        phase: Phase = _NONE,
    ) -> None:
        sock.setblocking(False)
        conn = _Conn(sock, Connection(self.options.limits, ended), peer)
        if phase == _PARAMS:
            # A new connection must send its first request promptly.
            conn.phase = _PARAMS
            conn.deadline = self._now + self.settings.params_timeout
        elif phase == _PRIVATE:
            conn.phase = _PRIVATE
        if leftover:
            conn.proto.receive_data(leftover)
        self.conns[conn.fd] = conn
        # Most connections arrive with their first request already sent: serve it now, and
        # watch the connection only if it stays open.
        self._serve(conn)

    def _watch(self, conn: _Conn) -> None:
        if not conn.registered and conn.fd in self.conns:
            self._epoll.register(conn.fd, select.EPOLLIN)
            conn.registered = True

    def _close(self, conn: _Conn) -> None:
        self.pending.pop(conn.fd, None)
        if self.conns.pop(conn.fd, None) is not None and conn.registered:
            try:
                self._epoll.unregister(conn.fd)
            except OSError:
                pass
        if conn.body is not None:
            conn.body.close()
            conn.body = None
        conn.request = None
        try:
            conn.sock.close()
        except OSError:
            pass

    def _release_idle(self) -> None:
        """On drain: pass idle keep-alive connections on, or close them on a plain stop."""
        for conn in list(self.conns.values()):
            if conn.phase == _BUSY or conn.phase == _LINGER:
                continue  # a thread's (it comes back through _resume), or closing anyway
            if not conn.proto.idle or conn.request is not None:
                continue
            if conn.phase == _PRIVATE:
                self._close(conn)
            elif self._handoff_on_drain:
                if not conn.proto.has_buffered_input:
                    self._pass_on(conn)
            else:
                # A plain stop: serve what already arrived. An idle connection stays open for
                # STOP_IDLE_GRACE (nginx may be sending on it now), then closes; a request that
                # comes meanwhile is answered with the connection's end right behind it
                # (_ResponseSink.ending), so nginx never reuses it.
                self._serve(conn)
                if conn.fd in self.conns and conn.phase == _IDLE:
                    conn.deadline = min(conn.deadline, self._now + STOP_IDLE_GRACE)

    def _give_away_waiting(self) -> None:
        """Hand every connection with a request waiting, idle between requests and not the
        one in the app, to the hand-off socket, for a sibling to serve (until it is full).
        Runs in the stealer's thread under its lock (the loop's thread is in the app), or in
        the loop's thread while every request thread is busy."""
        if not self._live or self._draining or self.handoff_send is None:
            return
        current = self._app_conn
        if current is not None:
            self._repoll = True  # the loop's list of ready connections is stale now
        pending = self.pending
        waiting: list[_Conn] = []
        maybe: dict[int, _Conn] = {}
        for conn in self.conns.values():
            if conn is current or (conn.phase != _IDLE and conn.phase != _NONE):
                continue
            proto = conn.proto
            if conn.request is not None or not proto.idle or proto.must_close:
                continue
            if proto.has_buffered_input:
                # A whole request already read (pending); a part of one stays here.
                if conn.fd in pending and len(proto.leftover) <= STEAL_LEFTOVER_MAX:
                    waiting.append(conn)
            else:
                maybe[conn.fd] = conn
        if maybe:
            poller = select.poll()
            for fd in maybe:
                poller.register(fd, select.POLLIN)
            waiting += (maybe[fd] for fd, _mask in poller.poll(0))
        status_path = self.status_path
        for conn in waiting:
            if status_path is not None and self._status_request_waits(conn):
                # The master answers it: pass it now rather than queue it behind app requests
                # (so a status page on a kept-alive connection answers while all are busy).
                self._serve(conn)
                continue
            try:
                sent = offer_connection(
                    self.handoff_send, conn.fd, conn.proto.ended_ids, conn.proto.leftover
                )
            except OSError as exc:
                log.debug("could not give a waiting connection away: %s", exc)
                return
            if not sent:
                return  # the hand-off socket is full: the next turn tries again
            self.given_away += 1
            self._close(conn)

    def _status_request_waits(self, conn: _Conn) -> bool:
        """Whether what waits on the connection is a whole request for status_path: its bytes
        are looked at (MSG_PEEK) and parsed on a scratch protocol object, nothing consumed."""
        try:
            data = conn.sock.recv(STEAL_LEFTOVER_MAX, socket.MSG_PEEK)
        except OSError:
            return False
        scratch = Connection(self.options.limits, conn.proto.ended_ids)
        scratch.receive_data(conn.proto.leftover + data)
        request: RequestReady | None = None
        try:
            while True:
                event = scratch.next_event()
                kind = type(event)
                if kind is RequestReady:
                    request = event  # type: ignore[assignment]
                elif kind is StdinEnd:
                    return request is not None and self.is_status_request(request)
                elif kind is not StdinData:
                    return False
        except ProtocolError:
            return False

    def _pass_on(self, conn: _Conn) -> None:
        assert self.handoff_send is not None
        try:
            send_connection(self.handoff_send, conn.fd, conn.proto.ended_ids, conn.proto.leftover)
        except OSError as exc:
            log.warning("could not hand a connection over (%s); serving it to the end", exc)
            return
        self._close(conn)

    # ------------------------------------------------------------ deadlines

    def _await(self, conn: _Conn) -> None:
        """The connection has no complete request: note what it waits for, with its deadline."""
        proto = conn.proto
        if conn.phase == _PRIVATE:
            self._watch(conn)
            return
        if conn.request is not None:
            phase, timeout = _BODY, self.settings.body_timeout
        elif not proto.idle or proto.has_buffered_input:
            phase, timeout = _PARAMS, self.settings.params_timeout
        else:
            if self._draining and self._handoff_on_drain:
                self._pass_on(conn)
                if conn.fd not in self.conns:
                    return
            phase, timeout = _IDLE, self.settings.idle_timeout
        if phase != conn.phase:
            conn.phase = phase
            conn.deadline = self._now + timeout
        self._watch(conn)

    def _expire(self, conn: _Conn) -> None:
        phase = conn.phase
        opts = self.settings
        if phase == _IDLE:
            if _bytes_waiting(conn.sock):
                # A request arrived since the loop last looked: closing now would reset it under
                # the web server's feet. Serve it (the loop sees it readable) and look again.
                conn.deadline = self._now + (STOP_IDLE_GRACE if self._draining else 1.0)
                return
            log.debug("closing an idle keep-alive connection")
            self._close(conn)
        elif phase == _PARAMS:
            log.warning(
                "closed the connection from %s: its request did not arrive within "
                "params_timeout (%g s)",
                describe_peer(conn.sock, conn.peer),
                opts.params_timeout,
            )
            self._close(conn)
        elif phase == _BODY:
            received = conn.body.size if conn.body is not None else 0
            log.warning(
                "closed the connection from %s: the request body did not arrive within "
                "body_timeout (%g s, %d bytes received)",
                describe_peer(conn.sock, conn.peer),
                opts.body_timeout,
                received,
            )
            request = conn.request
            if request is not None and self._answer(
                conn, request.request_id, "408 Request Timeout", "the request body came too slowly"
            ):
                self._close_after_response(conn)
            else:
                self._close(conn)
        else:
            self._close(conn)

    # ------------------------------------------------------------ one connection

    def _serve(self, conn: _Conn) -> None:
        """Take in what the connection sent; serve at most one complete request, then return
        (fairness: one busy keep-alive connection never starves the others)."""
        if conn.phase == _LINGER:
            self._linger(conn)
            return
        proto = conn.proto
        while True:
            try:
                event = proto.next_event()
            except ProtocolError as exc:
                log.warning(
                    "protocol error from %s, closing the connection: %s",
                    describe_peer(conn.sock, conn.peer),
                    exc,
                )
                self._flush_replies(conn)
                self._close(conn)
                return
            if not self._flush_replies(conn):
                return
            if event is NEED_DATA:
                try:
                    data = conn.sock.recv(RECV_SIZE)
                except BlockingIOError:
                    self._await(conn)
                    return
                except OSError:
                    self._close(conn)
                    return
                proto.receive_data(data)
                continue
            kind = type(event)
            if kind is StdinData:
                if conn.request is None:
                    break
                body = conn.body
                if body is None:
                    body = conn.body = SpooledBody(self.settings.body_buffer_size)
                body.append(event.data)  # type: ignore[union-attr]
                limit = self.settings.max_body_size
                if limit and body.size > limit:
                    if not self._refuse_body(conn, limit):
                        return
                continue
            if kind is StdinEnd:
                request = conn.request
                if request is None:
                    break
                if self.status_path is not None and self.is_status_request(request):
                    self._pass_status(conn, request)
                    return
                self._handle_complete(conn, request)
                return
            if kind is RequestReady:
                conn.request = event  # type: ignore[assignment]
                limit = self.settings.max_body_size
                declared = event.params.get("CONTENT_LENGTH", "")  # type: ignore[union-attr]
                if limit and declared.isdigit() and int(declared) > limit:
                    if not self._refuse_body(conn, limit):
                        return
                continue
            if kind is RequestAborted:
                # The web server gave up on a request before the app saw it.
                request = conn.request
                self._drop_request(conn)
                if request is not None:
                    try:
                        send_all(
                            conn.sock,
                            proto.end_request(request.request_id, 1),
                            self.settings.send_timeout,
                        )
                    except ClientDisconnected:
                        self._close(conn)
                        return
                continue
            if kind is RequestRefused:
                log.warning("refused request %d: %s", event.request_id, event.reason)  # type: ignore[union-attr]
                if not self._answer(
                    conn,
                    event.request_id,  # type: ignore[union-attr]
                    "431 Request Header Fields Too Large",
                    event.reason,  # type: ignore[union-attr]
                ):
                    return
                if proto.must_close:
                    self._close_after_response(conn)
                    return
                continue
            if kind is ConnectionClosed:
                self._close(conn)
                return
            break
        # Stdin or abort records of a request that is not running here cannot occur: the
        # protocol ignores records of ended requests. Anything else is a bug in the peer.
        log.warning("unexpected %r between requests; closing the connection", event)
        self._close(conn)

    def _drop_request(self, conn: _Conn) -> None:
        conn.request = None
        if conn.body is not None:
            conn.body.close()
            conn.body = None

    def _refuse_body(self, conn: _Conn, limit: int) -> bool:
        """A body over max_body_size: 413 now, before receiving (or spooling) the rest of it.
        False when the connection was closed."""
        request = conn.request
        assert request is not None
        self._drop_request(conn)
        if not self._answer(
            conn,
            request.request_id,
            "413 Payload Too Large",
            f"request body over the {limit} byte limit",
        ):
            return False
        if conn.proto.must_close:
            self._close_after_response(conn)
            return False
        return True

    def _answer(self, conn: _Conn, request_id: int, status: str, text: str) -> bool:
        """Answer a request without the app; False when the connection was closed."""
        self._drop_request(conn)
        body = simple_response(status, text + "\n")
        proto = conn.proto
        try:
            send_all(
                conn.sock,
                proto.stdout(request_id, body) + proto.end_request(request_id),
                self.settings.send_timeout,
            )
        except ClientDisconnected:
            self._close(conn)
            return False
        return True

    def _handle_complete(self, conn: _Conn, request: RequestReady) -> None:
        """The whole request is here: run the app, then decide the connection's fate."""
        body = conn.body
        conn.request = None
        conn.body = None
        try:
            if not self._handle(conn, request, body):
                return
        finally:
            if body is not None:
                body.close()
        self._resume(conn)

    def _resume(self, conn: _Conn) -> None:
        """A response is sent and the connection still open: keep it alive, pass it on (when
        draining) or close it."""
        proto = conn.proto
        if proto.must_close:
            self._close_after_response(conn)
            return
        if self._draining and proto.idle and not proto.has_buffered_input:
            if self._handoff_on_drain and conn.phase != _PRIVATE:
                self._pass_on(conn)
            else:
                self._close(conn)
            return
        if conn.phase != _PRIVATE:
            conn.phase = _NONE
            conn.deadline = 0.0
        if proto.has_buffered_input:
            self._watch(conn)
            self.pending[conn.fd] = conn
        else:
            self._await(conn)

    def _close_after_response(self, conn: _Conn) -> None:
        """Close a connection whose last response is sent. If the web server may still be
        sending that request (the app did not read it all, or it was refused), read and drop
        the rest first, briefly and without blocking (the LINGER phase)."""
        proto = conn.proto
        if proto.unread_input:
            # What already arrived may hold the end of it.
            try:
                while proto.unread_input and isinstance(proto.next_event(), StdinData | StdinEnd):
                    pass
            except ProtocolError:
                pass
        if not proto.unread_input:
            self._close(conn)
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.phase = _LINGER
        conn.deadline = self._now + LINGER_SECONDS
        self.pending.pop(conn.fd, None)
        self._watch(conn)
        self._linger(conn)

    def _linger(self, conn: _Conn) -> None:
        while True:
            try:
                data = conn.sock.recv(RECV_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close(conn)
                return

    def _flush_replies(self, conn: _Conn) -> bool:
        out = conn.proto.data_to_send()
        if out:
            try:
                send_all(conn.sock, out, self.settings.send_timeout)
            except ClientDisconnected:
                self._close(conn)
                return False
        return True

    def _environ(self, event: RequestReady, body: SpooledBody | None) -> dict[str, Any]:
        stream = InputStream(body.reader() if body is not None else EMPTY_BODY)
        environ = build_environ(event.params, stream, self.errors, self.settings.script_name)
        environ["wsgi.file_wrapper"] = FileWrapper
        return environ

    def _pass_status(self, conn: _Conn, request: RequestReady) -> None:
        """A complete request for status_path: the master answers it. The worker forgets the
        connection, or answers 503 when it could not pass it on."""
        self._drop_request(conn)
        proto = conn.proto
        if self.pass_status(
            conn.sock, request, stdin_done=True, ended=proto.ended_ids, leftover=proto.leftover
        ):
            self._close(conn)
            return
        if not self._answer(
            conn, request.request_id, "503 Service Unavailable", "the status is not available"
        ):
            return
        self._resume(conn)

    def _handle(self, conn: _Conn, event: RequestReady, body: SpooledBody | None) -> bool:
        """Run one complete request through the app. False when the connection was closed."""
        sink = self._sink
        sink.start(conn.sock, conn.proto, event.request_id)
        environ = self._environ(event, body)
        began = time.monotonic()
        board = self.scoreboard
        if board is not None:
            board.begin(self.slot, time.time(), environ["REQUEST_METHOD"], request_uri(environ))
        slowlog = self.slowlog
        if slowlog is not None:
            slowlog.begin(self._ident, environ["REQUEST_METHOD"], request_uri(environ))
        self.requests += 1
        stealer = self._stealer
        try:
            if stealer is None or len(self.conns) < 2 or not self._listening:
                run_app(self.app, environ, sink.send, sink.finish)
            else:
                if not self._steal_armed:
                    stealer.arm(True)
                    self._steal_armed = True
                # Only inside the app may the stealer's thread touch the connection table.
                self._app_conn = conn
                stealer.in_app_since = began
                stealer.lock.release()
                try:
                    run_app(self.app, environ, sink.send, sink.finish)
                finally:
                    stealer.lock.acquire()
                    stealer.in_app_since = 0.0
                    self._app_conn = None
        except EndNotDelivered as exc:
            log.debug("the web server closed before the end of a complete response: %s", exc)
            self._close(conn)
            return False
        except ClientDisconnected as exc:
            log.info("client went away on %s: %s", environ.get("PATH_INFO"), exc)
            self._close(conn)
            return False
        except ResponseCutOff:
            self._close(conn)
            return False
        finally:
            if slowlog is not None:
                slowlog.end(self._ident)
            if board is not None:
                now = time.monotonic()
                board.record(self.slot, int(sink.status or 0), now - began)
                board.end(self.slot, self.requests, now)
            if self._logged_sink is not None:
                self._logged_sink.log_request(environ, began)
        return True

    # ------------------------------------------------------------ threads (threads > 1)

    def _dispatch(self, conn: _Conn, request: RequestReady) -> None:
        """The whole request is here: hand it and its connection to a thread. The loop stops
        watching the connection until _collect takes it back."""
        threads = self._threads
        assert threads is not None
        body = conn.body
        conn.request = None
        conn.body = None
        if conn.registered:
            self._epoll.unregister(conn.fd)
            conn.registered = False
        self.pending.pop(conn.fd, None)
        conn.resume_phase = _PRIVATE if conn.phase == _PRIVATE else _NONE
        conn.phase = _BUSY
        conn.deadline = 0.0
        self.requests += 1
        threads.submit((conn, request, body))

    def _collect(self, threads: _Threads) -> None:
        """Take back the connections whose responses the threads finished."""
        self._wakeup.drain()
        for conn, sent in threads.finished():
            conn.phase = conn.resume_phase
            if sent:
                self._resume(conn)
            else:
                self._close(conn)

    def _run_threaded(self, sink: _ResponseSink, job: _Job) -> bool:
        """In a thread: one request through the app. False when the connection must close.
        Touches only this request's connection and sink; the loop has let go of both."""
        conn, event, body = job
        try:
            sink.start(conn.sock, conn.proto, event.request_id)
            environ = self._environ(event, body)
            environ["wsgi.multithread"] = True
            began = time.monotonic()
            method, uri = environ["REQUEST_METHOD"], request_uri(environ)
            token = self._in_flight.begin(method, uri)
            slowlog = self.slowlog
            ident = threading.get_ident()
            if slowlog is not None:
                slowlog.begin(ident, method, uri)
            try:
                run_app(self.app, environ, sink.send, sink.finish)
            except EndNotDelivered as exc:
                log.debug("the web server closed before the end of a complete response: %s", exc)
                return False
            except ClientDisconnected as exc:
                log.info("client went away on %s: %s", environ.get("PATH_INFO"), exc)
                return False
            except ResponseCutOff:
                return False
            finally:
                if slowlog is not None:
                    slowlog.end(ident)
                self._in_flight.end(token, int(sink.status or 0), time.monotonic() - began)
                if isinstance(sink, _LoggedResponseSink):
                    sink.log_request(environ, began)
            return True
        finally:
            if body is not None:
                body.close()


_Job = tuple[_Conn, RequestReady, "SpooledBody | None"]


class _Threads:
    """N daemon threads, each with its own response sink, running the requests the loop
    submits. A finished request's connection goes back on `done`, and the wake-up pipe is
    poked so the loop takes it at once. `busy` (requests submitted and not yet collected) is
    the loop's alone. Daemon threads: SIGQUIT exits at once, whatever they run."""

    def __init__(
        self, count: int, make_sink: Callable[[], _ResponseSink], wakeup: WakeupPipe
    ) -> None:
        self.count = count
        self.busy = 0
        self.run: Callable[[_ResponseSink, _Job], bool] | None = None
        self._make_sink = make_sink
        self._wakeup = wakeup
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[_Conn, bool]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._poller = select.poll()
        self._poller.register(wakeup.read_fd, select.POLLIN)

    @property
    def full(self) -> bool:
        return self.busy >= self.count

    def start(self) -> None:
        for i in range(self.count):
            thread = threading.Thread(
                target=self._work, args=(self._make_sink(),), name=f"request-{i}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def submit(self, job: _Job) -> None:
        self.busy += 1
        self._jobs.put(job)

    def finished(self) -> Iterator[tuple[_Conn, bool]]:
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                return
            self.busy -= 1
            yield item

    def wait(self, timeout: float) -> list[tuple[int, int]]:
        """Block until a thread finishes (or a signal arrives), at most `timeout` seconds;
        the result reads as epoll events."""
        fd = self._wakeup.read_fd
        return [(fd, select.EPOLLIN)] if self._poller.poll(timeout * 1000) else []

    def _work(self, sink: _ResponseSink) -> None:
        run = self.run
        assert run is not None
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                sent = run(sink, job)
            except BaseException:  # noqa: BLE001 - a bug here must not lose the connection
                log.exception("request thread failed")
                sent = False
            self._done.put((job[0], sent))
            try:
                os.write(self._wakeup.write_fd, b"\0")
            except (BlockingIOError, OSError):
                pass  # full: the loop wakes anyway; closed: the worker is gone

    def stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(5)
        self._threads = []


class _ResponseSink:
    """Where the app's response goes: STDOUT records of the request being served, then its
    END_REQUEST. Every response, whether or not an access log is on, is written here, and its
    status noted (the first bytes are always the CGI head, "Status: NNN reason").

    A worker serves one request at a time, so it keeps one sink and start() points it at each
    request in turn: nothing is built per request but the two bound methods run_app gets.
    """

    __slots__ = ("sock", "proto", "request_id", "timeout", "status", "ending")
    sock: socket.socket
    proto: Connection
    request_id: int

    def __init__(self, timeout: float, ending: list[bool] | None = None) -> None:
        self.timeout = timeout
        # [True] once a plain stop runs (TERM): every response then ends its connection
        # (send_last). One flag for the worker's sinks, set from the signal, so a request in
        # the app when TERM came ends so too.
        self.ending = ending if ending is not None else [False]
        self.status = b""  # the three digits of the response's status; b"": none sent yet

    def start(self, sock: socket.socket, proto: Connection, request_id: int) -> None:
        self.sock = sock
        self.proto = proto
        self.request_id = request_id
        self.status = b""

    def send(self, data: bytes) -> None:
        """Send part of the response now."""
        if not self.status:
            self.status = bytes(data[8:11])
        send_all(self.sock, self.proto.stdout(self.request_id, data), self.timeout)

    def finish(self, data: bytes) -> None:
        """Send the last of the response and end the request, in one send. Raises
        EndNotDelivered when only the end was left to send and the web server had closed."""
        proto = self.proto
        rid = self.request_id
        send = send_last if self.ending[0] else send_all
        if data:
            if not self.status:
                self.status = bytes(data[8:11])
            send(self.sock, proto.stdout(rid, data) + proto.end_request(rid), self.timeout)
            return
        try:
            send(self.sock, proto.end_request(rid), self.timeout)
        except ClientDisconnected as exc:
            raise EndNotDelivered(str(exc)) from exc


class _LoggedResponseSink(_ResponseSink):
    """A sink that also counts the body's bytes (the CGI head excluded) and writes the
    request's access log line. A separate class so that without an access log the request
    path does not pay for the counting."""

    __slots__ = ("access_log", "body_bytes")

    def __init__(
        self, timeout: float, access_log: AccessLog, ending: list[bool] | None = None
    ) -> None:
        super().__init__(timeout, ending)
        self.access_log = access_log
        self.body_bytes = 0

    def start(self, sock: socket.socket, proto: Connection, request_id: int) -> None:
        super().start(sock, proto, request_id)
        self.body_bytes = 0

    def send(self, data: bytes) -> None:
        self._count(data)
        super().send(data)

    def finish(self, data: bytes) -> None:
        self._count(data)
        super().finish(data)

    def _count(self, data: bytes) -> None:
        if self.status:
            self.body_bytes += len(data)
            return
        if not data:
            return
        # The first bytes: the CGI head (whole: run_app sends it in one piece), then perhaps
        # the start of the body.
        head = data if type(data) is bytes else bytes(data)
        end = head.find(b"\r\n\r\n")
        self.body_bytes = len(head) - end - 4 if end >= 0 else 0

    def log_request(self, environ: dict[str, Any], began: float) -> None:
        self.access_log.write(environ, self.status, self.body_bytes, began)
