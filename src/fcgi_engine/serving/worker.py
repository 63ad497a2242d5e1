"""The worker: one process, one request at a time, many connections.

It watches the shared listening socket, its own keep-alive connections and (when a generation
hands connections over) the hand-off socket in one epoll set, so an idle keep-alive connection
never starves a new one. Draining stops accepting, finishes the request in hand, and passes every
idle keep-alive connection to the next generation through the hand-off socket instead of closing
it under the web server's feet.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TextIO

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
from fcgi_engine.serving.body import ClientDisconnected, InputStream
from fcgi_engine.serving.environ import build_environ
from fcgi_engine.serving.loader import WSGIApp
from fcgi_engine.serving.scoreboard import Scoreboard
from fcgi_engine.serving.wsgi import FileWrapper, ResponseCutOff, run_app, simple_response
from fcgi_engine.system.wakeup import WakeupPipe

log = logging.getLogger("fcgi_engine.worker")

RECV_SIZE = 256 * 1024
# How long a closing connection may keep draining a request body nobody will read.
LINGER_SECONDS = 2.0
_EPOLLEXCLUSIVE = getattr(select, "EPOLLEXCLUSIVE", 0)


@dataclass(frozen=True)
class WorkerOptions:
    limits: Limits = Limits()
    max_body_size: int = 0
    io_timeout: float = 60.0
    max_requests: int = 0
    script_name: str | None = None
    allowed_addrs: frozenset[str] = frozenset()
    access_log: str | None = None


class _Conn:
    __slots__ = ("sock", "fd", "proto", "registered")

    def __init__(self, sock: socket.socket, proto: Connection) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.proto = proto
        self.registered = False


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


def recv_some(sock: socket.socket, timeout: float) -> bytes:
    """One recv on a non-blocking socket, waiting at most `timeout` for data."""
    while True:
        try:
            return sock.recv(RECV_SIZE)
        except BlockingIOError:
            _wait(sock, select.POLLIN, timeout)
        except OSError as exc:
            raise ClientDisconnected(f"recv failed: {exc}") from exc


def _wait(sock: socket.socket, flag: int, timeout: float) -> None:
    poller = select.poll()
    poller.register(sock, flag)
    if not poller.poll(timeout * 1000):
        raise ClientDisconnected(f"no progress for {timeout:.0f} s")


class ErrorStream:
    """wsgi.errors: text the app writes goes to the error log, a line at a time."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(text)
        return len(text)

    def writelines(self, lines: list[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._stream.flush()


class Worker:
    def __init__(
        self,
        app: WSGIApp,
        listener: socket.socket,
        options: WorkerOptions,
        *,
        handoff_send: socket.socket | None = None,
        handoff_recv: socket.socket | None = None,
        private: socket.socket | None = None,
        scoreboard: Scoreboard | None = None,
        slot: int = 0,
        errors: TextIO | None = None,
    ) -> None:
        self.app = app
        self.listener = listener
        self.options = options
        self.handoff_send = handoff_send
        self.handoff_recv = handoff_recv
        self.private = private
        self.scoreboard = scoreboard
        self.slot = slot
        self.errors = ErrorStream(errors or sys.stderr)
        self.requests = 0
        self.conns: dict[int, _Conn] = {}
        # Connections with a whole request already buffered: served before waiting again.
        self.pending: dict[int, _Conn] = {}
        self._draining = False
        self._handoff_on_drain = False
        self._parent = os.getppid()
        self._epoll = select.epoll()
        self._wakeup = WakeupPipe()
        self._family = int(listener.family)
        self._access_fd = -1
        self._reopen_logs = False
        self._open_access_log()

    def _open_access_log(self) -> None:
        path = self.options.access_log
        if not path:
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        if self._access_fd >= 0:
            os.close(self._access_fd)
        self._access_fd = fd

    def _log_access(self, environ: dict[str, Any], status: bytes, size: int, began: float) -> None:
        uri = environ.get("REQUEST_URI") or (
            environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        )
        when = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        took = (time.monotonic() - began) * 1000
        line = (
            f"{environ.get('REMOTE_ADDR', '-')} - - [{when}] "
            f'"{environ.get("REQUEST_METHOD", "-")} {uri} {environ.get("SERVER_PROTOCOL", "-")}" '
            f"{status.decode('latin-1') or '-'} {size} {took:.1f}ms\n"
        )
        try:
            os.write(self._access_fd, line.encode("latin-1", "replace"))
        except OSError as exc:
            log.error("cannot write the access log: %s", exc)

    # ------------------------------------------------------------ signals

    def install_signals(self) -> None:
        self._wakeup.install()
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGQUIT, self._on_quit)
        signal.signal(signal.SIGINT, self._on_quit)
        signal.signal(signal.SIGTTIN, signal.SIG_IGN)
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def _on_term(self, signum: int, frame: Any) -> None:
        self._draining = True

    def _on_hup(self, signum: int, frame: Any) -> None:
        self._draining = True
        self._handoff_on_drain = self.handoff_send is not None

    def _on_usr1(self, signum: int, frame: Any) -> None:
        self._reopen_logs = True

    def _on_quit(self, signum: int, frame: Any) -> None:
        raise SystemExit(0)

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        ep = self._epoll
        listen_fd = self.listener.fileno()
        self.listener.setblocking(False)
        ep.register(listen_fd, select.EPOLLIN | _EPOLLEXCLUSIVE)
        handoff_fd = -1
        if self.handoff_recv is not None:
            # Shared by every worker of every generation: never block on it.
            self.handoff_recv.setblocking(False)
            handoff_fd = self.handoff_recv.fileno()
            ep.register(handoff_fd, select.EPOLLIN | _EPOLLEXCLUSIVE)
        ep.register(self._wakeup.read_fd, select.EPOLLIN)
        if self.private is not None:
            self._adopt(self.private, b"")
        accepting = True
        turns = 0
        while True:
            if self._draining and accepting:
                accepting = False
                ep.unregister(listen_fd)
                if handoff_fd >= 0:
                    ep.unregister(handoff_fd)
                self._release_idle()
            if self._draining and not self.conns:
                return
            try:
                events = ep.poll(0 if self.pending else 1.0)
            except InterruptedError:
                continue
            if self.pending:
                ready = list(self.pending.values())
                self.pending.clear()
                for conn in ready:
                    if conn.fd in self.conns:
                        self._serve(conn)
            if self._reopen_logs:
                self._reopen_logs = False
                self._open_access_log()
            # The parent-death signal normally tells us; this is the fallback, checked when idle
            # or every so often rather than on every event (it is a system call).
            turns += 1
            if (not events or turns % 1024 == 0) and os.getppid() != self._parent:
                log.warning("worker %d: generation is gone, exiting", os.getpid())
                return
            for fd, _mask in events:
                if fd == listen_fd:
                    if accepting:
                        self._accept()
                elif fd == self._wakeup.read_fd:
                    self._wakeup.drain()
                elif fd == handoff_fd:
                    if accepting:
                        self._receive_handoff()
                else:
                    watched = self.conns.get(fd)
                    if watched is not None:
                        self._serve(watched)
                if self._draining:
                    break
            if (
                self.options.max_requests
                and self.requests >= self.options.max_requests
                and not self._draining
            ):
                log.info("worker %d: served %d requests, recycling", os.getpid(), self.requests)
                self._draining = True
                self._handoff_on_drain = self.handoff_send is not None

    def _accept(self) -> None:
        # One connection per readiness event: the listener stays readable while its backlog is
        # not empty, and the other workers get their share of a burst.
        listener = self.listener
        try:
            # socket._accept and a socket built from known family and type skip the work
            # socket.accept() redoes on every call (enum conversions of family and type).
            fd, addr = listener._accept()  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.error("accept failed: %s", exc)
                return
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                return
            raise
        sock = socket.socket(self._family, socket.SOCK_STREAM, 0, fd)
        if self.options.allowed_addrs and isinstance(addr, tuple):
            if addr[0] not in self.options.allowed_addrs:
                log.warning("refused a connection from %s (not in FCGI_WEB_SERVER_ADDRS)", addr[0])
                sock.close()
                return
        self._adopt(sock, b"")

    def _receive_handoff(self) -> None:
        # One connection per wake-up, as with accept: a generation's worth of handed-over
        # keep-alive connections spreads over the new workers instead of piling on one.
        assert self.handoff_recv is not None
        try:
            message, fds, _flags, _addr = socket.recv_fds(self.handoff_recv, RECV_SIZE, 1)
        except (BlockingIOError, InterruptedError):
            return
        if fds:
            ended, leftover = decode_handoff(message)
            self._adopt(socket.socket(fileno=fds[0]), leftover, ended)

    def _adopt(self, sock: socket.socket, leftover: bytes, ended: Iterable[int] = ()) -> None:
        sock.setblocking(False)
        conn = _Conn(sock, Connection(self.options.limits, ended))
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
        try:
            conn.sock.close()
        except OSError:
            pass

    def _release_idle(self) -> None:
        """On drain: pass idle keep-alive connections on, or close them on a plain stop."""
        for conn in list(self.conns.values()):
            if not conn.proto.idle:
                continue
            if conn.sock is self.private:
                self._close(conn)
            elif self._handoff_on_drain:
                self._pass_on(conn)
            else:
                # A plain stop: serve what already arrived, then close.
                self._serve(conn)
                if conn.fd in self.conns:
                    self._close(conn)

    def _pass_on(self, conn: _Conn) -> None:
        assert self.handoff_send is not None
        self.handoff_send.settimeout(5.0)
        try:
            message = encode_handoff(conn.proto.ended_ids, conn.proto.leftover)
            socket.send_fds(self.handoff_send, [message], [conn.fd])
        except OSError as exc:
            log.warning("could not hand a connection over (%s); serving it to the end", exc)
            return
        self._close(conn)

    # ------------------------------------------------------------ one connection

    def _serve(self, conn: _Conn) -> None:
        """Serve at most one request on this connection, then return (fairness: one busy
        keep-alive connection never starves the others); watch it while it stays open."""
        proto = conn.proto
        sock = conn.sock
        timeout = self.options.io_timeout
        while True:
            try:
                event = proto.next_event()
            except ProtocolError as exc:
                log.warning("protocol error from the web server, closing the connection: %s", exc)
                self._flush_replies(conn)
                self._close(conn)
                return
            if not self._flush_replies(conn):
                return
            if event is NEED_DATA:
                try:
                    if proto.idle:
                        try:
                            data = sock.recv(RECV_SIZE)
                        except BlockingIOError:
                            if (
                                self._draining
                                and self._handoff_on_drain
                                and conn.sock is not self.private
                            ):
                                self._pass_on(conn)
                            else:
                                self._watch(conn)
                            return
                    else:
                        data = recv_some(sock, timeout)
                except (ClientDisconnected, OSError):
                    self._close(conn)
                    return
                proto.receive_data(data)
                continue
            if isinstance(event, RequestReady):
                if not self._handle(conn, event):
                    return
                if proto.must_close:
                    self._close_after_response(conn)
                    return
                if self._draining and proto.idle and not proto.has_buffered_input:
                    if self._handoff_on_drain and conn.sock is not self.private:
                        self._pass_on(conn)
                    else:
                        self._close(conn)
                    return
                self._watch(conn)
                if proto.has_buffered_input:
                    self.pending[conn.fd] = conn
                return
            if isinstance(event, RequestRefused):
                log.warning("refused request %d: %s", event.request_id, event.reason)
                body = simple_response("431 Request Header Fields Too Large", event.reason + "\n")
                try:
                    send_all(
                        sock,
                        proto.stdout(event.request_id, body) + proto.end_request(event.request_id),
                        timeout,
                    )
                except ClientDisconnected:
                    self._close(conn)
                    return
                if proto.must_close:
                    self._close_after_response(conn)
                    return
                continue
            if isinstance(event, ConnectionClosed):
                self._close(conn)
                return
            # Stdin or abort records of a request that is not running here cannot occur: the
            # protocol ignores records of ended requests. Anything else is a bug in the peer.
            log.warning("unexpected %r between requests; closing the connection", event)
            self._close(conn)
            return

    def _close_after_response(self, conn: _Conn) -> None:
        """Close a connection whose last response is sent. If the web server may still be
        sending that request (the app did not read it all, or it was refused), read and drop
        the rest first, briefly: closing on unread data resets the connection, and the web
        server could lose the response or answer 502."""
        proto = conn.proto
        if proto.unread_input:
            # What already arrived may hold the end of it.
            try:
                while proto.unread_input and isinstance(proto.next_event(), StdinData | StdinEnd):
                    pass
            except ProtocolError:
                pass
        if proto.unread_input:
            sock = conn.sock
            deadline = time.monotonic() + LINGER_SECONDS
            try:
                sock.shutdown(socket.SHUT_WR)
                while (left := deadline - time.monotonic()) > 0:
                    if not recv_some(sock, left):
                        break
            except (ClientDisconnected, OSError):
                pass
        self._close(conn)

    def _flush_replies(self, conn: _Conn) -> bool:
        out = conn.proto.data_to_send()
        if out:
            try:
                send_all(conn.sock, out, self.options.io_timeout)
            except ClientDisconnected:
                self._close(conn)
                return False
        return True

    def _handle(self, conn: _Conn, event: RequestReady) -> bool:
        """Run one request. False when the connection was closed."""
        proto = conn.proto
        sock = conn.sock
        rid = event.request_id
        timeout = self.options.io_timeout
        aborted = False

        def pull() -> bytes:
            nonlocal aborted
            while True:
                try:
                    ev = proto.next_event()
                except ProtocolError as exc:
                    raise ClientDisconnected(f"protocol error: {exc}") from exc
                if ev is NEED_DATA:
                    proto.receive_data(recv_some(sock, timeout))
                    continue
                if isinstance(ev, StdinData):
                    return ev.data
                if isinstance(ev, StdinEnd):
                    return b""
                if isinstance(ev, RequestAborted):
                    aborted = True
                    raise ClientDisconnected("the web server aborted the request")
                if isinstance(ev, ConnectionClosed):
                    raise ClientDisconnected("the web server closed the connection")
                raise ClientDisconnected(f"unexpected {ev!r} while reading the body")

        def send_stdout(data: bytes) -> None:
            send_all(sock, proto.stdout(rid, data), timeout)

        def finish(data: bytes) -> None:
            out = (
                proto.stdout(rid, data) + proto.end_request(rid) if data else proto.end_request(rid)
            )
            send_all(sock, out, timeout)

        if self._access_fd >= 0:
            sent = _Tally()
            plain_send, plain_finish = send_stdout, finish

            def note(data: bytes) -> None:
                if not sent.status and data[:8] == b"Status: ":
                    sent.status = bytes(data[8:11])
                sent.size += len(data)

            def send_stdout(data: bytes) -> None:
                note(data)
                plain_send(data)

            def finish(data: bytes) -> None:
                note(data)
                plain_finish(data)

        stream = InputStream(pull, self.options.max_body_size)
        environ = build_environ(event.params, stream, self.errors, self.options.script_name)
        environ["wsgi.file_wrapper"] = FileWrapper
        began = time.monotonic()
        limit = self.options.max_body_size
        declared = environ.get("CONTENT_LENGTH", "")
        if limit and declared.isdigit() and int(declared) > limit:
            app: WSGIApp = _refuse_body(limit)
        else:
            app = self.app
        board = self.scoreboard
        if board is not None:
            board.begin(self.slot, time.time(), environ["PATH_INFO"])
        self.requests += 1
        try:
            run_app(app, environ, send_stdout, finish)
        except ClientDisconnected as exc:
            if aborted and not proto.idle:
                try:
                    send_all(sock, proto.end_request(rid, 1), timeout)
                    return True
                except ClientDisconnected:
                    pass
            log.info("client went away on %s: %s", environ.get("PATH_INFO"), exc)
            self._close(conn)
            return False
        except ResponseCutOff:
            self._close(conn)
            return False
        finally:
            if board is not None:
                board.end(self.slot, self.requests)
            if self._access_fd >= 0:
                self._log_access(environ, sent.status, sent.size, began)
        return True


class _Tally:
    """What the access log needs of a response: its status and size."""

    __slots__ = ("status", "size")

    def __init__(self) -> None:
        self.status = b""
        self.size = 0


def _refuse_body(limit: int) -> WSGIApp:
    def too_large(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = f"request body over the {limit} byte limit\n".encode()
        start_response(
            "413 Payload Too Large",
            [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return too_large


def encode_handoff(ended: list[int], leftover: bytes) -> bytes:
    """What travels with a handed-over connection: the request ids it already ended (their late
    records must still be ignored) and the bytes received but not parsed yet."""
    ended = ended[-255:]
    return bytes([len(ended)]) + b"".join(i.to_bytes(2, "big") for i in ended) + leftover


def decode_handoff(message: bytes) -> tuple[list[int], bytes]:
    if not message:
        return [], b""
    count = message[0]
    ids = [int.from_bytes(message[1 + 2 * i : 3 + 2 * i], "big") for i in range(count)]
    return ids, message[1 + 2 * count :]
