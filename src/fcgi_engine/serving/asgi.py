"""The ASGI worker: one process, one asyncio event loop, many requests at once.

Each FastCGI connection is a task on the loop (uvloop when installed). The task reads its
connection without blocking, with the deadlines of the WSGI worker (params, idle, send), and
runs each request's app call itself, so a connection holds at most one request, as FastCGI
without multiplexing has it; max_concurrency bounds the app calls in flight (past it, a request
waits for a turn, it is not dropped). The body is not read ahead: `receive` reads STDIN records
as the app asks for them (backpressure: nginx waits, memory stays flat), bounded by body_timeout
(counted while waiting for the web server only) plus body_min_rate. `send` writes STDOUT
records as the app sends; an app error before the head went out is a 500, after it the
connection is closed without END_REQUEST, so the web server sees a cut-off response.

The process contract is the WSGI worker's (worker.py): a worker of a generation still proving
itself serves only its private connection until SIGUSR2, and ASGI lifespan startup completes
before that connection is answered (a failing startup exits 1 with the error on stderr, which
fails the boot); HUP drains with hand-off of idle keep-alive connections, TERM drains, QUIT and
INT exit now, USR1 reopens the access log; lifespan shutdown ends a drain, bounded by
graceful_timeout. The scoreboard shows the oldest request in flight, so `timeout` catches one
that blocks the loop, and a heartbeat is written every SWEEP_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from fcgi_engine.handoff import send_connection
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
from fcgi_engine.serving.access_log import request_uri
from fcgi_engine.serving.asgi_scope import build_scope, declared_length, response_head
from fcgi_engine.serving.body import ClientDisconnected
from fcgi_engine.serving.scoreboard import InFlight
from fcgi_engine.serving.worker import LINGER_SECONDS, RECV_SIZE, describe_peer
from fcgi_engine.serving.worker_base import SWEEP_SECONDS, Phase, WorkerBase
from fcgi_engine.serving.wsgi import ERROR_500, clip_to_length, simple_response

log = logging.getLogger("fcgi_engine.worker")

ASGIApp = Callable[..., Awaitable[None]]
Message = MutableMapping[str, Any]

_DISCONNECT: dict[str, Any] = {"type": "http.disconnect"}
_WOKEN = object()  # a wait ended by the worker itself (a drain), not by the socket


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed, else asyncio's."""
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _as_signal_handler(handler: Callable[[], None]) -> Callable[[int, Any], None]:
    return lambda _signum, _frame: handler()


def _resolve(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


class _Conn:
    """One FastCGI connection and the task serving it."""

    __slots__ = (
        "sock",
        "fd",
        "proto",
        "peer",
        "phase",
        "deadline",
        "waiter",
        "read_lock",
        "write_lock",
        "closed",
        "task",
    )

    def __init__(self, sock: socket.socket, proto: Connection, peer: Any, phase: Phase) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.proto = proto
        self.peer = peer
        self.phase = phase
        self.deadline = 0.0
        self.waiter: asyncio.Future[Any] | None = None
        self.read_lock = asyncio.Lock()
        self.write_lock = asyncio.Lock()
        self.closed = False
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        if self.waiter is not None:
            _resolve(self.waiter, _WOKEN)


class _Cut(Exception):
    """The connection must close without ending the request (a cut-off response)."""


class AsgiWorker(WorkerBase[_Conn, ASGIApp]):
    def _setup(self) -> None:
        self.errors = self.error_stream
        self._drain_started = 0.0
        # Requests in the app: the scoreboard shows the oldest, so `timeout` catches one that
        # blocks the loop.
        self._in_flight = InFlight(self.scoreboard, self.slot)
        self._state: dict[str, Any] | None = None
        self._lifespan: _Lifespan | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._nap: asyncio.Future[None] | None = None
        self._slots: asyncio.Semaphore | None = None

    # ------------------------------------------------------------ signals

    def _poke(self) -> None:
        """Wake the main loop now (it otherwise wakes every SWEEP_SECONDS)."""
        if self._nap is not None:
            _resolve(self._nap, None)

    # ------------------------------------------------------------ the loop

    def run(self) -> None:
        loop = new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
            # Drained: what the app left running (background tasks) is cancelled.
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        finally:
            # On SystemExit (QUIT, a failed startup) nothing more runs: the process exits.
            asyncio.set_event_loop(None)
            loop.close()
            self._loop = None

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        for signum, handler in self.signal_handlers().items():
            loop.add_signal_handler(signum, handler)
        self._slots = asyncio.Semaphore(max(1, self.settings.max_concurrency))
        if self.slowlog is not None:
            self.slowlog.start()
        self.listener.setblocking(False)
        if self.handoff_recv is not None:
            self.handoff_recv.setblocking(False)
        if self.settings.lifespan != "off":
            self._lifespan = _Lifespan(self.app, self.settings.lifespan == "on")
            await self._lifespan.startup()
            self._state = self._lifespan.state if self._lifespan.supported else None
        if self.private is not None:
            self._adopt(self.private, b"", phase=Phase.PRIVATE)
        while True:
            now = time.monotonic()
            self._housekeeping(now)
            if self._draining and not self._drain_started:
                self._drain_started = now
                self._release_idle()
            nap = SWEEP_SECONDS
            if self._serving_backlog:
                # A stop serving the listen queue dry (worker_base._serve_backlog).
                room = (
                    len(self.conns) < self.settings.worker_connections
                    and now >= self._accept_paused_until
                )
                backlog_wait = self._serve_backlog(now, room)
                if backlog_wait is not None:
                    nap = backlog_wait
            if self._draining and not self.conns and not self._serving_backlog:
                break
            self._update_listening()
            if nap <= 0:
                # Let the connection just taken start before taking the next.
                await asyncio.sleep(0)
                continue
            self._nap = loop.create_future()
            timer = loop.call_later(nap, _resolve, self._nap, None)
            try:
                await self._nap
            finally:
                timer.cancel()
                self._nap = None
        self._update_listening()
        if self._lifespan is not None and self._lifespan.supported:
            spent = time.monotonic() - (self._drain_started or time.monotonic())
            await self._lifespan.shutdown(max(1.0, self.settings.graceful_timeout - spent))

    def _update_listening(self) -> None:
        want = (
            self._live
            and not self._draining
            and len(self.conns) < self.settings.worker_connections
            and time.monotonic() >= self._accept_paused_until
        )
        if want == self._listening or self._loop is None:
            return
        self._listening = want
        loop = self._loop
        if want:
            loop.add_reader(self.listener.fileno(), self._accept)
            if self.handoff_recv is not None:
                loop.add_reader(self.handoff_recv.fileno(), self._receive_handoff)
        else:
            loop.remove_reader(self.listener.fileno())
            if self.handoff_recv is not None:
                loop.remove_reader(self.handoff_recv.fileno())

    def _adopt(
        self,
        sock: socket.socket,
        leftover: bytes,
        ended: Iterable[int] = (),
        *,
        peer: Any = None,
        phase: Phase = Phase.NONE,
    ) -> None:
        sock.setblocking(False)
        conn = _Conn(sock, Connection(self.options.limits, ended), peer, phase)
        if phase == Phase.PARAMS:
            conn.deadline = time.monotonic() + self.settings.params_timeout
        if leftover:
            conn.proto.receive_data(leftover)
        self.conns[conn.fd] = conn
        assert self._loop is not None
        conn.task = self._loop.create_task(self._serve(conn))
        if len(self.conns) >= self.settings.worker_connections:
            self._update_listening()

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.wake()
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
        if self._loop is not None:
            self._loop.remove_reader(conn.fd)
            self._loop.remove_writer(conn.fd)
        try:
            conn.sock.close()
        except OSError:
            pass
        if self._draining and not self.conns:
            self._poke()
        elif not self._listening:
            self._update_listening()

    def _release_idle(self) -> None:
        """On drain: wake every connection that waits between requests; each then passes itself
        on (HUP) or closes (TERM)."""
        for conn in list(self.conns.values()):
            if conn.phase in (Phase.IDLE, Phase.PRIVATE, Phase.NONE) and conn.proto.idle:
                conn.wake()

    def _pass_on(self, conn: _Conn) -> bool:
        assert self.handoff_send is not None
        try:
            send_connection(self.handoff_send, conn.fd, conn.proto.ended_ids, conn.proto.leftover)
        except OSError as exc:
            log.warning("could not hand a connection over (%s); serving it to the end", exc)
            return False
        self._close(conn)
        return True

    # ------------------------------------------------------------ socket I/O

    async def _readable(self, conn: _Conn, timeout: float | None) -> Any:
        """Wait until the connection is readable: True, False on timeout, _WOKEN when woken."""
        loop = self._loop
        assert loop is not None
        fut = loop.create_future()
        conn.waiter = fut
        loop.add_reader(conn.fd, _resolve, fut, True)
        timer = (
            loop.call_later(max(0.0, timeout), _resolve, fut, False)
            if timeout is not None
            else None
        )
        try:
            return await fut
        finally:
            conn.waiter = None
            if not conn.closed:
                loop.remove_reader(conn.fd)
            if timer is not None:
                timer.cancel()

    async def _recv(self, conn: _Conn, timeout: float | None) -> Any:
        """Bytes (b"": the peer closed), None on timeout, _WOKEN when woken meanwhile."""
        async with conn.read_lock:
            while True:
                if conn.closed:
                    return b""
                try:
                    return conn.sock.recv(RECV_SIZE)
                except BlockingIOError:
                    pass
                except OSError:
                    return b""
                ready = await self._readable(conn, timeout)
                if ready is not True:
                    return None if ready is False else _WOKEN

    async def _send(self, conn: _Conn, data: bytes) -> None:
        """Send everything, waiting at most send_timeout for the web server to read any of it.
        Raises ClientDisconnected when it cannot."""
        if conn.closed:
            raise ClientDisconnected("the connection is closed")
        view = memoryview(data)
        if not conn.write_lock.locked():
            try:
                view = view[conn.sock.send(view) :]
            except BlockingIOError:
                pass
            except OSError as exc:
                raise ClientDisconnected(f"send failed: {exc}") from exc
            if not view:
                return
        loop = self._loop
        assert loop is not None
        timeout = self.settings.send_timeout
        async with conn.write_lock:
            while view:
                if conn.closed:
                    raise ClientDisconnected("the connection is closed")
                try:
                    view = view[conn.sock.send(view) :]
                    continue
                except BlockingIOError:
                    pass
                except OSError as exc:
                    raise ClientDisconnected(f"send failed: {exc}") from exc
                fut = loop.create_future()
                loop.add_writer(conn.fd, _resolve, fut, True)
                timer = loop.call_later(timeout, _resolve, fut, False)
                try:
                    ok = await fut
                finally:
                    if not conn.closed:
                        loop.remove_writer(conn.fd)
                    timer.cancel()
                if not ok:
                    raise ClientDisconnected(
                        f"the web server read nothing for {timeout:g} s (send_timeout)"
                    )

    async def _flush_replies(self, conn: _Conn) -> None:
        out = conn.proto.data_to_send()
        if out:
            await self._send(conn, out)

    # ------------------------------------------------------------ one connection

    async def _serve(self, conn: _Conn) -> None:
        try:
            await self._serve_requests(conn)
        except ClientDisconnected:
            pass
        except _Cut:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("error serving a connection from %s", describe_peer(conn.sock, conn.peer))
        finally:
            self._close(conn)

    def _await_phase(self, conn: _Conn) -> float | None:
        """The connection needs bytes: note what it waits for; the seconds it may wait."""
        proto = conn.proto
        if conn.phase == Phase.PRIVATE:
            return None
        if not proto.idle or proto.has_buffered_input:
            phase, timeout = Phase.PARAMS, self.settings.params_timeout
        else:
            phase, timeout = Phase.IDLE, self.settings.idle_timeout
        now = time.monotonic()
        if phase != conn.phase:
            conn.phase = phase
            conn.deadline = now + timeout
        return conn.deadline - now

    async def _serve_requests(self, conn: _Conn) -> None:
        proto = conn.proto
        settings = self.settings
        while True:
            try:
                event = proto.next_event()
            except ProtocolError as exc:
                log.warning(
                    "protocol error from %s, closing the connection: %s",
                    describe_peer(conn.sock, conn.peer),
                    exc,
                )
                await self._flush_replies(conn)
                return
            await self._flush_replies(conn)
            if event is NEED_DATA:
                if self._draining and proto.idle and not proto.has_buffered_input:
                    if conn.phase != Phase.PRIVATE and self._handoff_on_drain:
                        self._pass_on(conn)
                    return
                timeout = self._await_phase(conn)
                data = await self._recv(conn, timeout)
                if data is _WOKEN:
                    continue
                if data is None:
                    self._expired(conn)
                    return
                proto.receive_data(data)
                continue
            kind = type(event)
            if kind is RequestReady:
                assert isinstance(event, RequestReady)
                limit = settings.max_body_size
                declared = event.params.get("CONTENT_LENGTH", "")
                if self.status_path is not None and self.is_status_request(event):
                    if self.pass_status(
                        conn.sock,
                        event,
                        stdin_done=False,
                        ended=proto.ended_ids,
                        leftover=proto.leftover,
                    ):
                        # The master has the connection now: only our copy closes.
                        return
                    await self._answer(
                        conn,
                        event.request_id,
                        "503 Service Unavailable",
                        "the status is not available",
                    )
                elif limit and declared.isdigit() and int(declared) > limit:
                    await self._answer(
                        conn,
                        event.request_id,
                        "413 Payload Too Large",
                        f"request body over the {limit} byte limit",
                    )
                else:
                    await self._run(conn, event)
                if conn.closed:
                    return
                if proto.must_close:
                    await self._linger(conn)
                    return
                conn.phase = Phase.PRIVATE if conn.phase == Phase.PRIVATE else Phase.NONE
                continue
            if kind is RequestRefused:
                assert isinstance(event, RequestRefused)
                log.warning("refused request %d: %s", event.request_id, event.reason)
                await self._answer(
                    conn, event.request_id, "431 Request Header Fields Too Large", event.reason
                )
                if proto.must_close:
                    await self._linger(conn)
                    return
                continue
            if kind is ConnectionClosed:
                return
            log.warning("unexpected %r between requests; closing the connection", event)
            return

    def _expired(self, conn: _Conn) -> None:
        if conn.phase == Phase.PARAMS:
            log.warning(
                "closed the connection from %s: its request did not arrive within "
                "params_timeout (%g s)",
                describe_peer(conn.sock, conn.peer),
                self.settings.params_timeout,
            )
        else:
            log.debug(
                "closing a keep-alive connection idle for %g s (idle_timeout)",
                self.settings.idle_timeout,
            )

    async def _answer(self, conn: _Conn, request_id: int, status: str, text: str) -> None:
        """Answer a request without the app."""
        proto = conn.proto
        body = simple_response(status, text + "\n")
        await self._send(conn, proto.stdout(request_id, body) + proto.end_request(request_id))

    async def _linger(self, conn: _Conn) -> None:
        """Before closing on a request whose body the web server may still be sending: read
        and drop the rest, briefly (closing on unread data resets the connection)."""
        proto = conn.proto
        try:
            while proto.unread_input and isinstance(proto.next_event(), StdinData | StdinEnd):
                pass
        except ProtocolError:
            return
        if not proto.unread_input:
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        deadline = time.monotonic() + LINGER_SECONDS
        while True:
            data = await self._recv(conn, deadline - time.monotonic())
            if not isinstance(data, bytes) or not data:
                return

    # ------------------------------------------------------------ one request

    async def _run(self, conn: _Conn, event: RequestReady) -> None:
        slots = self._slots
        assert slots is not None
        async with slots:
            request = _Request(self, conn, event, self._state)
            params = event.params
            method, uri = params["REQUEST_METHOD"], request_uri(params)
            token = self._in_flight.begin(method, uri)
            slowlog = self.slowlog
            if slowlog is not None:
                slowlog.begin(conn.task, method, uri)
            began = time.monotonic()
            self.requests += 1
            limit = self.options.max_requests
            if limit and self.requests >= limit and not self._draining:
                # Stop taking connections now: the main loop only looks twice a second.
                log.info("worker %d: served %d requests, recycling", os.getpid(), self.requests)
                self._draining = True
                self._handoff_on_drain = self.handoff_send is not None
                self._update_listening()
                self._poke()
            try:
                await request.call(self.app)
            finally:
                if slowlog is not None:
                    slowlog.end(conn.task)
                status = request.status
                self._in_flight.end(token, int(status or 0), time.monotonic() - began)
                if self.access_log is not None:
                    self.access_log.write(params, status, request.body_bytes, began)


class _Request:
    """One request in the app: its receive and send."""

    __slots__ = (
        "worker",
        "conn",
        "rid",
        "params",
        "scope",
        "path",
        "body_done",
        "received",
        "waited",
        "disconnected",
        "aborted",
        "head",
        "head_sent",
        "finished",
        "status",
        "body_bytes",
        "remaining",
        "excess",
    )

    def __init__(
        self,
        worker: AsgiWorker,
        conn: _Conn,
        event: RequestReady,
        state: dict[str, Any] | None,
    ) -> None:
        self.worker = worker
        self.conn = conn
        self.rid = event.request_id
        self.params = event.params
        self.scope = build_scope(event.params, worker.settings.script_name, state)
        self.path: str = self.scope["path"]
        self.body_done = False
        self.received = 0
        self.waited = 0.0  # seconds spent waiting for the body from the web server
        self.disconnected = False
        self.aborted = False
        self.head: bytes | None = None  # the response head, held until the first body
        self.head_sent = False
        self.finished = False  # END_REQUEST sent (or the request otherwise over)
        self.status = b""
        self.body_bytes = 0  # response body bytes sent (the access log's size)
        # Body bytes still due by the response's Content-Length (-1: none declared): the
        # message that completes it ends the request, so its end goes out in the same send.
        self.remaining = -1
        self.excess = 0  # body bytes the app sent past its Content-Length (dropped)

    async def call(self, app: ASGIApp) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._failed(exc)
        else:
            await self._returned()
        finally:
            # A receive still waiting (for a disconnect) gives up its read of the connection.
            self.conn.wake()

    async def _returned(self) -> None:
        if self.excess:
            log.error(
                "app error on %s %s: %d body bytes past its Content-Length, dropped",
                self.scope["method"],
                self.path,
                self.excess,
            )
        if self.finished:
            return
        if self.disconnected and self.conn.closed:
            raise _Cut()
        if self.head is None and not self.head_sent:
            log.error(
                "app error on %s %s: it returned without starting a response",
                self.scope["method"],
                self.path,
            )
            await self._end_with(ERROR_500)
        else:
            # The app returned before its last body message: end the response as it is.
            await self._finish(b"")

    async def _failed(self, exc: Exception) -> None:
        method = self.scope["method"]
        if self.disconnected:
            log.info("client went away on %s %s: %r", method, self.path, exc)
            if not self.finished:
                raise _Cut()
            return
        log.error("app error on %s %s", method, self.path, exc_info=exc)
        if self.finished:
            return
        if self.head_sent:
            # Never a complete-looking response: close without END_REQUEST.
            self.finished = True
            raise _Cut()
        self.head = None
        await self._end_with(ERROR_500)

    # ------------------------------------------------------------ receive

    async def receive(self) -> Message:
        if self.finished or self.disconnected:
            return _DISCONNECT
        worker = self.worker
        conn = self.conn
        proto = conn.proto
        settings = worker.settings
        while True:
            if self.finished or self.disconnected or conn.closed:
                self.disconnected = True
                return _DISCONNECT
            try:
                event = proto.next_event()
            except ProtocolError as exc:
                log.warning(
                    "protocol error from %s during a request: %s",
                    describe_peer(conn.sock, conn.peer),
                    exc,
                )
                self.disconnected = True
                worker._close(conn)
                return _DISCONNECT
            kind = type(event)
            if kind is StdinData:
                assert isinstance(event, StdinData)
                self.received += len(event.data)
                limit = settings.max_body_size
                if limit and self.received > limit:
                    await self._refuse(
                        "413 Payload Too Large", f"request body over the {limit} byte limit"
                    )
                    return _DISCONNECT
                return {"type": "http.request", "body": event.data, "more_body": True}
            if kind is StdinEnd:
                self.body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            if kind is RequestAborted or kind is ConnectionClosed:
                self.aborted = kind is RequestAborted
                self.disconnected = True
                if kind is ConnectionClosed:
                    worker._close(conn)
                return _DISCONNECT
            if event is not NEED_DATA:
                continue
            out = proto.data_to_send()
            if out:
                try:
                    await worker._send(conn, out)
                except ClientDisconnected:
                    self.disconnected = True
                    worker._close(conn)
                    return _DISCONNECT
            if self.body_done:
                # Only a disconnect (or the request's end) can come now.
                timeout = None
            else:
                rate = settings.body_min_rate
                allowed = settings.body_timeout + (self.received / rate if rate else 0.0)
                timeout = max(0.001, allowed - self.waited)
            started = time.monotonic()
            data = await worker._recv(conn, timeout)
            if not self.body_done:
                self.waited += time.monotonic() - started
            if data is _WOKEN:
                continue
            if data is None:
                log.warning(
                    "closed the connection from %s: the request body did not arrive within "
                    "body_timeout (%g s, %d bytes received)",
                    describe_peer(conn.sock, conn.peer),
                    settings.body_timeout,
                    self.received,
                )
                await self._refuse("408 Request Timeout", "the request body came too slowly")
                worker._close(conn)
                return _DISCONNECT
            if self.finished:
                # A late receive after the response ended: leave the bytes to the connection.
                proto.receive_data(data)
                return _DISCONNECT
            proto.receive_data(data)

    async def _refuse(self, status: str, text: str) -> None:
        """Answer the request without the app (before its response started); the app's own
        sends are then dropped. A started response is cut off instead."""
        self.disconnected = True
        if self.finished:
            return
        if self.head_sent:
            self.finished = True
            self.worker._close(self.conn)
            return
        self.head = None
        try:
            await self._end_with(simple_response(status, text + "\n"))
        except ClientDisconnected:
            self.worker._close(self.conn)

    # ------------------------------------------------------------ send

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if self.finished or self.disconnected:
                if self.disconnected:
                    raise ClientDisconnected("the client went away")
                # A response ended by its Content-Length: what follows must be empty.
                self.excess += len(message.get("body", b""))
                return
            if self.head is None and not self.head_sent:
                raise RuntimeError("http.response.body before http.response.start")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if self.remaining >= 0:
                body, excess, complete, self.remaining = clip_to_length(body, self.remaining)
                self.excess += excess
                more = more and not complete
            if more:
                if body or self.head is not None:
                    await self._stdout(body)
            else:
                await self._finish(body)
            return
        if kind == "http.response.start":
            if self.head is not None or self.head_sent:
                raise RuntimeError("http.response.start sent twice")
            if self.finished:
                if self.disconnected:
                    raise ClientDisconnected("the client went away")
                return
            headers = message.get("headers", ())
            if not isinstance(headers, (list, tuple)):
                headers = list(headers)  # read twice: for the head and the Content-Length
            self.head = response_head(int(message["status"]), headers)
            self.status = self.head[8:11]
            self.remaining = declared_length(headers)
            return
        raise RuntimeError(f"unexpected ASGI message type {kind!r}")

    def _take_head(self, body: bytes) -> bytes:
        head = self.head
        if head is None:
            return body
        self.head = None
        self.head_sent = True
        return head + body if body else head

    async def _stdout(self, body: bytes) -> None:
        data = self._take_head(body)
        self.body_bytes += len(body)
        conn = self.conn
        try:
            await self.worker._send(conn, conn.proto.stdout(self.rid, data))
        except ClientDisconnected:
            self.disconnected = True
            self.finished = True
            self.worker._close(conn)
            raise

    async def _finish(self, body: bytes) -> None:
        data = self._take_head(body)
        self.body_bytes += len(body)
        await self._end_with_data(data)

    async def _end_with(self, response: bytes) -> None:
        """The whole response (head included) and the request's end."""
        self.status = response[8:11]
        self.body_bytes = len(response) - response.find(b"\r\n\r\n") - 4
        self.head_sent = True
        await self._end_with_data(response)

    async def _end_with_data(self, data: bytes) -> None:
        conn = self.conn
        proto = conn.proto
        app_status = 1 if self.aborted else 0
        self.finished = True
        out = proto.stdout(self.rid, data) if data else b""
        try:
            await self.worker._send(conn, out + proto.end_request(self.rid, app_status))
        except ClientDisconnected as exc:
            self.worker._close(conn)
            if not data and not self.aborted:
                # Only the end was left: the response went out whole, and the web server
                # closed once it had it (lighttpd does, on Content-Length). No failure.
                log.debug("the web server closed before the end of a complete response: %s", exc)
                return
            self.disconnected = True
            raise


class _Lifespan:
    """The ASGI lifespan protocol, run as a task beside the worker."""

    def __init__(self, app: ASGIApp, required: bool) -> None:
        self.app = app
        self.required = required
        self.state: dict[str, Any] = {}
        self.supported = False
        self.task: asyncio.Task[None] | None = None
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.outbox: asyncio.Queue[Message] = asyncio.Queue()
        self.error: BaseException | None = None
        # The app took the startup event: from then on an error is a failed startup, not an
        # app that does not speak lifespan (those raise on the scope's type before receiving).
        self.took_startup = False

    async def _run(self) -> None:
        scope: dict[str, Any] = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        try:
            await self.app(scope, self._receive, self._send)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - reported by startup/shutdown
            self.error = exc

    async def _receive(self) -> Message:
        message = await self.inbox.get()
        self.took_startup = True
        return message

    async def _send(self, message: Message) -> None:
        await self.outbox.put(message)

    async def _reply(self, timeout: float | None) -> Message | None:
        """The app's next lifespan message; None when the app returned or raised first."""
        assert self.task is not None
        getter = asyncio.ensure_future(self.outbox.get())
        try:
            done, _ = await asyncio.wait(
                {getter, self.task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not getter.done():
                getter.cancel()
                try:
                    await getter
                except asyncio.CancelledError:
                    pass
        if getter in done:
            return getter.result()
        return None

    async def startup(self) -> None:
        """Run lifespan startup; exit 1 (the boot fails) when it fails."""
        self.task = asyncio.get_running_loop().create_task(self._run())
        await self.inbox.put({"type": "lifespan.startup"})
        reply = await self._reply(None)
        if reply is not None and reply.get("type") == "lifespan.startup.complete":
            self.supported = True
            return
        if reply is not None and reply.get("type") == "lifespan.startup.failed":
            message = reply.get("message", "") or "(no message)"
            self._fail(f"ASGI lifespan startup failed: {message}")
        if reply is not None:
            self._fail(f"ASGI lifespan startup: unexpected message {reply.get('type')!r}")
        # The app returned or raised without a word.
        if self.error is not None and self.took_startup:
            self._fail("ASGI lifespan startup failed")
        if self.required:
            self._fail("ASGI lifespan startup failed (lifespan: on)")
        log.debug("the app does not support ASGI lifespan (%r); going on without", self.error)

    def _fail(self, what: str) -> None:
        error = self.error
        text = what.rstrip() + "\n"
        if error is not None:
            text += "".join(traceback.format_exception(error))
        sys.stderr.write(text)
        sys.stderr.flush()
        raise SystemExit(1)

    async def shutdown(self, timeout: float) -> None:
        if self.task is None or self.task.done():
            return
        await self.inbox.put({"type": "lifespan.shutdown"})
        reply = await self._reply(timeout)
        if reply is None and not self.task.done():
            log.warning("ASGI lifespan shutdown did not finish within %.0f s", timeout)
        elif reply is not None and reply.get("type") == "lifespan.shutdown.failed":
            log.error("ASGI lifespan shutdown failed: %s", reply.get("message", ""))
        elif self.error is not None:
            log.error("ASGI lifespan shutdown failed", exc_info=self.error)
        if not self.task.done():
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
