"""What every Python worker process shares, whatever runs its requests (the inline or threaded
WSGI worker in worker.py, the ASGI worker in asgi.py): its place in the generation (live or
still proving itself, the private proof connection, the scoreboard slot), signals as flags,
accepting (the TCP allow-list, the back-off when out of descriptors), taking handed-over
connections, the request for `status_path` passed to the master (status_request,
pass_status), the slowlog, and the housekeeping of each sweep (heartbeat, log reopening, the
parent's life).

A subclass says how a connection is served (`_adopt`), how the shared socket is watched
(`_update_listening`) and how its loop is woken early (`_poke`).
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TextIO, TypeVar

from fcgi_engine.config.address import AllowList
from fcgi_engine.config.settings import ServerConfig
from fcgi_engine.handoff import receive_connection
from fcgi_engine.protocol import Limits, RequestReady, encode_name_values
from fcgi_engine.serving.access_log import AccessLog
from fcgi_engine.serving.scoreboard import Scoreboard
from fcgi_engine.serving.slowlog import SlowLog
from fcgi_engine.status_pass import pass_status_request, request_path
from fcgi_engine.system.ratelog import RateLimitedLog

log = logging.getLogger("fcgi_engine.worker")

# How often deadlines are checked and the heartbeat written; deadlines are that precise.
SWEEP_SECONDS = 0.5
# After accept fails for want of file descriptors (or memory), stop accepting this long: the
# listener stays readable, and retrying at once would spin at full CPU.
ACCEPT_BACKOFF = 0.5
RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# A stop serving the listen queue dry: the queue must stay empty this long before the worker
# closes its copy of the listener. New connections are refused already; this covers a handshake
# begun before that, whose last ACK is still on its way (one round trip on a LAN), so that it
# is served rather than reset by the close.
BACKLOG_QUIET = 0.1
BACKLOG_POLL = 0.02


@dataclass(frozen=True)
class WorkerOptions:
    """What one worker runs with: the server's settings as ServerConfig declares them (the one
    table; a new setting needs no field here) and what the generation derives from them."""

    settings: ServerConfig
    limits: Limits
    allowed: AllowList | None  # the TCP peers taken; None: every peer
    max_requests: int  # settings.max_requests, plus this worker's share of the jitter

    @classmethod
    def derive(
        cls, settings: ServerConfig, *, allowed_addrs: Iterable[str], nproc: int, jitter: int = 0
    ) -> WorkerOptions:
        allowed = AllowList(list(allowed_addrs))
        return cls(
            settings=settings,
            limits=Limits(
                max_params_size=settings.max_params_size, max_conns=nproc, max_reqs=nproc
            ),
            allowed=None if allowed.allows_any else allowed,
            max_requests=settings.max_requests + jitter if settings.max_requests else 0,
        )


class Phase(enum.IntEnum):
    """What a connection is waiting for; each phase but PRIVATE and BUSY has a deadline."""

    NONE = 0  # nothing decided yet
    PARAMS = 1  # the rest of a request's params (from its first byte, or from the accept)
    BODY = 2  # the rest of a request's body
    IDLE = 3  # the next request on a kept-alive connection
    LINGER = 4  # the end of a request nobody will read, before closing
    PRIVATE = 5  # the generation's proof connection: never expires
    BUSY = 6  # its request runs in a thread: not watched, no deadline, not the loop's


# Read on every accept: a module name costs nothing, `Phase.PARAMS` a metaclass lookup.
_PARAMS = Phase.PARAMS
ConnT = TypeVar("ConnT")
AppT = TypeVar("AppT")


class WorkerBase(Generic[ConnT, AppT]):
    """The contract prefork.py starts every worker class with; `_setup` is the subclass's own
    construction."""

    def __init__(
        self,
        app: AppT,
        listener: socket.socket,
        options: WorkerOptions,
        *,
        handoff_send: socket.socket | None = None,
        handoff_recv: socket.socket | None = None,
        private: socket.socket | None = None,
        scoreboard: Scoreboard | None = None,
        slot: int = 0,
        errors: TextIO | None = None,
        live: bool = True,
        access_fd: int = -1,
        status_pass: socket.socket | None = None,
        backlog_flag: Any = None,
    ) -> None:
        self.app = app
        # Where the app's errors (wsgi.errors) and tracebacks go.
        self.error_stream = errors or sys.stderr
        self.listener = listener
        self.options = options
        self.settings = options.settings
        self.handoff_send = handoff_send
        self.handoff_recv = handoff_recv
        self.private = private
        self.scoreboard = scoreboard
        self.slot = slot
        self.requests = 0
        self.conns: dict[int, ConnT] = {}
        # A generation still proving itself keeps its workers off the shared socket.
        self._live = live
        self._listening = False
        self._draining = False
        self._handoff_on_drain = False
        # A stop whose listener refuses new connections: the generation's shared byte says so
        # (backlog_flag[0] == 1) before the TERM. Then the worker accepts until the queue stays
        # empty for BACKLOG_QUIET, and closes its copy of the listener.
        self._backlog_flag = backlog_flag
        self._serving_backlog = False
        self._backlog_empty_since: float | None = None
        self._reopen_logs = False
        self._accept_paused_until = 0.0
        self._parent = os.getppid()
        self._family = int(listener.family)
        self._limited_log = RateLimitedLog(log)
        # The access log the generation opened (access_fd), else the configured file opened
        # here; None when there is none.
        path = options.settings.access_log
        self.access_log = (
            AccessLog(path, access_fd, options.settings.access_log_format)
            if access_fd >= 0 or path
            else None
        )
        # Where a request for status_path goes (the master answers it); without status_path
        # the request path never looks.
        self.status_pass = status_pass
        self.status_path = options.settings.status_path
        self.slowlog = self._open_slowlog()
        self._setup()

    def _open_slowlog(self) -> SlowLog | None:
        timeout = self.settings.slowlog_timeout
        if timeout <= 0:
            return None
        try:
            return SlowLog(self.settings.slowlog, timeout)
        except OSError as exc:
            log.error(
                "cannot open the slowlog %s (%s); writing it to the error log",
                self.settings.slowlog,
                exc,
            )
            return SlowLog(None, timeout)

    def _setup(self) -> None:
        """The subclass's own state."""

    # ------------------------------------------------------------ what a subclass provides

    def _adopt(
        self,
        sock: socket.socket,
        leftover: bytes,
        ended: Iterable[int] = (),
        *,
        peer: Any = None,
        phase: Phase = Phase.NONE,
    ) -> None:
        raise NotImplementedError

    def _update_listening(self) -> None:
        raise NotImplementedError

    def _poke(self) -> None:
        """Wake the loop now, where a signal alone does not."""

    # ------------------------------------------------------------ signals, as flags

    def signal_handlers(self) -> dict[int, Callable[[], None]]:
        return {
            signal.SIGTERM: self._on_term,
            signal.SIGHUP: self._on_hup,
            signal.SIGQUIT: self._on_quit,
            signal.SIGINT: self._on_quit,
            signal.SIGUSR1: self._on_usr1,
            signal.SIGUSR2: self._on_live,
        }

    def install_signals(self) -> None:
        for signum, handler in self.signal_handlers().items():
            signal.signal(signum, _as_signal_handler(handler))
        # A resize is the generation's business; the generation reaps nothing of ours.
        signal.signal(signal.SIGTTIN, signal.SIG_IGN)
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def _on_term(self) -> None:
        if not self._draining and self._backlog_flag is not None and self._backlog_flag[0] == 1:
            self._serving_backlog = True
        self._draining = True
        self._poke()

    def _on_hup(self) -> None:
        self._draining = True
        self._handoff_on_drain = self.handoff_send is not None
        self._poke()

    def _on_usr1(self) -> None:
        self._reopen_logs = True
        self._poke()

    def _on_live(self) -> None:
        self._live = True
        self._poke()

    def _on_quit(self) -> None:
        raise SystemExit(0)

    # ------------------------------------------------------------ taking connections

    def _accept(self) -> None:
        # One connection per readiness event: the listener stays readable while its backlog is
        # not empty, and the other workers get their share of a burst.
        try:
            # socket._accept and a socket built from known family and type skip the work
            # socket.accept() redoes on every call (enum conversions of family and type).
            fd, addr = self.listener._accept()  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in RESOURCE_ERRORS:
                self._out_of_resources(f"accept failed: {exc.strerror}")
                return
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                return
            raise
        self._take(fd, addr)

    def _serve_backlog(self, now: float, room: bool) -> float | None:
        """While a stop serves the listen queue dry: accept one queued connection (when there is
        `room` to take one). Returns how long the loop may wait before calling again, or None
        once the queue stayed empty for BACKLOG_QUIET and the worker closed its copy of the
        listener (then it only finishes what it holds)."""
        if not self._serving_backlog:
            return None
        if not room:
            return SWEEP_SECONDS
        before = len(self.conns)
        # The queue includes connections the master took from it while every worker was busy
        # (to find status requests) and handed on through the hand-off socket.
        took = self._accept_one() or (self.handoff_recv is not None and self._receive_handoff())
        if took:
            self._backlog_empty_since = None
            return 0.0
        if len(self.conns) != before:
            return 0.0
        if self._backlog_empty_since is None:
            self._backlog_empty_since = now
        if now - self._backlog_empty_since < BACKLOG_QUIET:
            return BACKLOG_POLL
        self._serving_backlog = False
        try:
            self.listener.close()
        except OSError:
            pass
        return None

    def _accept_one(self) -> bool:
        """Accept one connection if one is queued (False when none is)."""
        try:
            fd, addr = self.listener._accept()  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno in RESOURCE_ERRORS:
                self._out_of_resources(f"accept failed: {exc.strerror}")
                return False
            if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                return True
            raise
        self._take(fd, addr)
        return True

    def _take(self, fd: int, addr: Any) -> None:
        sock = socket.socket(self._family, socket.SOCK_STREAM, 0, fd)
        allowed = self.options.allowed
        if allowed is not None and isinstance(addr, tuple) and not allowed.allows(addr[0]):
            self._limited_log(
                "refused",
                f"refused a connection from {addr[0]} (not in FCGI_WEB_SERVER_ADDRS / "
                f"allowed_addrs: {', '.join(allowed.entries)})",
                time.monotonic(),
                logging.WARNING,
            )
            sock.close()
            return
        self._adopt(sock, b"", peer=addr, phase=_PARAMS)

    def _out_of_resources(self, what: str) -> None:
        now = time.monotonic()
        self._accept_paused_until = now + ACCEPT_BACKOFF
        self._update_listening()
        self._limited_log(
            "resources",
            f"worker {os.getpid()}: {what}; not accepting for {ACCEPT_BACKOFF:g} s "
            f"({len(self.conns)} connections open)",
            now,
        )

    def _receive_handoff(self) -> bool:
        """Take one handed-over connection, if one waits (True when one was taken)."""
        # One connection per wake-up, as with accept: a generation's worth of handed-over
        # keep-alive connections spreads over the new workers instead of piling on one.
        assert self.handoff_recv is not None
        try:
            handed = receive_connection(self.handoff_recv)
        except OSError as exc:
            if exc.errno in RESOURCE_ERRORS:
                self._out_of_resources(f"receiving a handed-over connection failed: {exc}")
            return False
        if handed is None:
            return False
        if handed.sock is None:
            # The kernel could not give us the descriptor (we are at our limit).
            self._out_of_resources("a handed-over connection was lost: no file descriptor left")
            return True
        self._adopt(handed.sock, handed.leftover, handed.ended)
        return True

    # ------------------------------------------------------------ the status request

    def is_status_request(self, request: RequestReady) -> bool:
        """Whether the request asks for status_path (the master answers it, not the app)."""
        return self.status_path is not None and request_path(request.params) == self.status_path

    def pass_status(
        self,
        sock: socket.socket,
        request: RequestReady,
        *,
        stdin_done: bool,
        ended: list[int],
        leftover: bytes,
    ) -> bool:
        """Pass the connection of a status request to the master, which answers it (even when
        every worker is busy); the caller then forgets the connection. False when it could not
        be passed: the caller answers 503."""
        if self.status_pass is None:
            log.warning("a request for status_path %s, but no way to the master", self.status_path)
            return False
        params = encode_name_values(
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in request.params.items()
        )
        try:
            pass_status_request(
                self.status_pass,
                sock,
                request.request_id,
                request.keep_conn,
                params,
                stdin_done,
                ended,
                leftover,
            )
        except OSError as exc:
            self._limited_log(
                "status",
                f"could not pass a request for {self.status_path} to the master: {exc}",
                time.monotonic(),
            )
            return False
        return True

    # ------------------------------------------------------------ housekeeping

    def _housekeeping(self, now: float) -> None:
        """Each sweep: the heartbeat, a log reopen asked for, and the parent's life."""
        if self.scoreboard is not None:
            self.scoreboard.heartbeat(self.slot, now)
        self._limited_log.flush(now)
        if self._reopen_logs:
            self._reopen_logs = False
            try:
                if self.access_log is not None:
                    self.access_log.reopen()
            except OSError as exc:
                log.error("cannot reopen the access log: %s", exc)
            try:
                if self.slowlog is not None:
                    self.slowlog.reopen()
            except OSError as exc:
                log.error("cannot reopen the slowlog: %s", exc)
        # The parent-death signal (HUP) normally tells us; this is the fallback. Either way the
        # worker drains with hand-off: its idle keep-alive connections wait in the hand-off
        # socket for the generation the master boots next, instead of being closed on nginx.
        if os.getppid() != self._parent and not self._draining:
            log.warning("worker %d: its generation is gone; draining", os.getpid())
            self._draining = True
            self._handoff_on_drain = self.handoff_send is not None


def _as_signal_handler(handler: Callable[[], None]) -> Callable[[int, Any], None]:
    return lambda _signum, _frame: handler()
