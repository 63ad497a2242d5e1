"""The master's plain-HTTP listener for orchestrators (`status_listen`): readiness, liveness and
the status JSON, answered by the master itself, with no app code and no FastCGI.

    GET /readyz  200 "ready\\n" while a proven generation serves and no stop has begun,
                 else 503 "not ready: <reason>\\n"
    GET /livez   200 "ok\\n" (whoever answers is the master's loop, running)
    GET /status  200 application/json: the master's status snapshot (as `status --json`)
    other paths  404; other methods 405 (HEAD is GET without the body)

HTTP/1.1, one request per connection (`Connection: close`), Content-Length on every answer.
Nothing here blocks the master: the sockets are non-blocking and watched by its selector, a
request is read up to MAX_REQUEST bytes, each connection has CONNECTION_TIMEOUT from accept to
its last byte sent, and at most MAX_CONNECTIONS are open (a new one evicts the oldest).
"""

from __future__ import annotations

import errno
import json
import logging
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("fcgi_engine.master")

# A probe's request is a line and a few headers.
MAX_REQUEST = 8192
# From accept to the last byte of the answer: a probe that takes longer is not one.
CONNECTION_TIMEOUT = 5.0
# Orchestrators probe a few times a second at most; the cap bounds the fds a flood can take.
MAX_CONNECTIONS = 32
_ACCEPTS_PER_WAKEUP = 16
# accept() failing for want of fds: stop watching the listener this long rather than spin.
ACCEPT_BACKOFF = 0.5
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS[503] = "Service Unavailable"


@dataclass
class _Conn:
    sock: socket.socket
    deadline: float
    received: bytearray = field(default_factory=bytearray)
    reply: bytes = b""  # once set, what is left to send
    writing: bool = False


def answer(
    method: str,
    target: str,
    snapshot: Callable[[], dict[str, Any]],
    not_ready: Callable[[], str | None],
) -> tuple[int, str, bytes]:
    """(status, content type, body) for one request line's method and target."""
    path = target.split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return 405, "text/plain; charset=utf-8", b"only GET and HEAD\n"
    if path == "/readyz":
        reason = not_ready()
        if reason is None:
            return 200, "text/plain; charset=utf-8", b"ready\n"
        return 503, "text/plain; charset=utf-8", f"not ready: {reason}\n".encode()
    if path == "/livez":
        return 200, "text/plain; charset=utf-8", b"ok\n"
    if path == "/status":
        body = json.dumps(snapshot(), sort_keys=True).encode() + b"\n"
        return 200, "application/json", body
    return 404, "text/plain; charset=utf-8", b"not found: /readyz, /livez, /status\n"


def _response(status: int, content_type: str, body: bytes, head_only: bool) -> bytes:
    headers = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if status == 405:
        headers.append("Allow: GET, HEAD")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + (b"" if head_only else body)


class HttpStatusServer:
    """Answers on `listener` through the master's selector (keys "http-listen", "http-conn")."""

    def __init__(
        self,
        listener: socket.socket,
        sel: selectors.BaseSelector,
        snapshot: Callable[[], dict[str, Any]],
        not_ready: Callable[[], str | None],
    ) -> None:
        self.listener = listener
        self.sel = sel
        self.snapshot = snapshot
        self.not_ready = not_ready
        self.conns: dict[int, _Conn] = {}
        self.paused_until = 0.0
        self.watching = False

    def start(self) -> None:
        self.listener.setblocking(False)
        self._watch(True)

    def _watch(self, want: bool) -> None:
        if want == self.watching:
            return
        if want:
            self.sel.register(self.listener, selectors.EVENT_READ, ("http-listen", None))
        else:
            self.sel.unregister(self.listener)
        self.watching = want

    def accept(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self.paused_until = time.monotonic() + ACCEPT_BACKOFF
                    self._watch(False)
                    log.warning("status_listen: cannot accept (%s); pausing", exc)
                return
            if len(self.conns) >= MAX_CONNECTIONS:
                oldest = min(self.conns.values(), key=lambda c: c.deadline)
                self._close(oldest)
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + CONNECTION_TIMEOUT)
            try:
                self.sel.register(sock, selectors.EVENT_READ, ("http-conn", conn))
            except (OSError, ValueError):
                sock.close()
                continue
            self.conns[sock.fileno()] = conn

    def ready(self, conn: _Conn, mask: int) -> None:
        if conn.writing:
            self._send(conn)
        else:
            self._read(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.received += data
        end = conn.received.find(b"\r\n\r\n")
        if end < 0:
            end = conn.received.find(b"\n\n")
        if end < 0:
            if len(conn.received) >= MAX_REQUEST:
                self._reply(conn, 400, "text/plain; charset=utf-8", b"request too long\n", False)
            return
        line = bytes(conn.received).split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._reply(conn, 400, "text/plain; charset=utf-8", b"bad request line\n", False)
            return
        method, target = parts[0], parts[1]
        try:
            status, content_type, body = answer(method, target, self.snapshot, self.not_ready)
        except Exception as exc:  # the snapshot is ours; a bug there must not end the master
            log.exception("status_listen: cannot answer %s", target)
            status, content_type, body = 503, "text/plain; charset=utf-8", f"{exc}\n".encode()
        self._reply(conn, status, content_type, body, method == "HEAD")

    def _reply(
        self, conn: _Conn, status: int, content_type: str, body: bytes, head_only: bool
    ) -> None:
        conn.reply = _response(status, content_type, body, head_only)
        conn.writing = True
        try:
            self.sel.modify(conn.sock, selectors.EVENT_WRITE, ("http-conn", conn))
        except (OSError, ValueError, KeyError):
            self._close(conn)
            return
        self._send(conn)

    def _send(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.reply)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.reply = conn.reply[sent:]
        if not conn.reply:
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if self.conns.pop(conn.sock.fileno(), None) is None:
            return
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        try:
            # What the client sent beyond its request (it should not) would make the close a
            # reset that can cut the answer short: read it away first.
            conn.sock.recv(MAX_REQUEST)
        except OSError:
            pass
        conn.sock.close()

    def tick(self, now: float) -> None:
        for conn in [c for c in self.conns.values() if now >= c.deadline]:
            self._close(conn)
        if not self.watching and now >= self.paused_until:
            self._watch(True)

    def close_connections(self) -> None:
        """Before a re-exec: the listener is carried over, connections are not."""
        for conn in list(self.conns.values()):
            self._close(conn)
        self._watch(False)
