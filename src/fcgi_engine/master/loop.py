"""The master's I/O shell: turns signals, children and control requests into policy events and
carries the policy's actions out. It holds the listening socket until the server stops.

Leaving (the policy's StopAccepting): a listener the master owns takes no new connection from
then on while the queued ones stay acceptable (a unix socket's path is unlinked; a TCP
listener drops new SYNs, sockets.refuse_new_connections). The generation is told so (channel
Stop) before its SIGTERM, and its workers accept the queue dry before they close their copies;
the master closes its own copy once it sees the queue empty, so that when the last copy goes,
late connects are refused (which nginx retries elsewhere) and no queued connection is reset. A
listener someone else holds (systemd socket activation, fd 0 from a web server) is left alone:
its queue waits for whoever serves next.

With status_listen, the master also answers plain HTTP there (master/http_status.py):
/readyz, /livez, /status."""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fcgi_engine import channel, control
from fcgi_engine.channel import WorkerInfo
from fcgi_engine.config.address import AllowList
from fcgi_engine.config.boot import ENV_KEY, for_server
from fcgi_engine.config.settings import ServerConfig, resolve_allowed_addrs
from fcgi_engine.control import unhandled
from fcgi_engine.master import policy as P
from fcgi_engine.master.http_status import HttpStatusServer
from fcgi_engine.master.status_server import StatusServer
from fcgi_engine.protocol import Limits
from fcgi_engine.system import interpreter, logfile, sockets
from fcgi_engine.system.listenq import ListenQueue
from fcgi_engine.system.logfile import redirect_stderr
from fcgi_engine.system.notify import (
    Notifier,
    RolloutOutcome,
    ServiceReporter,
    ServiceState,
    child_environment,
)
from fcgi_engine.system.ratelog import RateLimitedLog
from fcgi_engine.system.wakeup import WakeupPipe

log = logging.getLogger("fcgi_engine.master")

HANDLED_SIGNALS = (
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
REEXEC_ENV = "FCGI_ENGINE_REEXEC"
_TAIL = 16384

# Control clients are the manager and operators: a handful at a time. The cap bounds the fds a
# flood of idle connections can take from the master. A connection over it evicts the oldest one
# yet to send its request (so a flood cannot keep `status` out for the 10 s below); when every
# slot waits for a reply (graceful, stop), accepting stops and the kernel backlog holds the rest.
MAX_CONTROL_CONNS = 64
# A control client writes its one short line as soon as it connects, so 10 s is ample on a loaded
# machine; the deadline runs from accept and data does not extend it, so a trickler cannot hold a
# slot for longer.
CONTROL_REQUEST_TIMEOUT = 10.0
# A control request line is a small JSON object; a longer one is garbage or an attack.
MAX_CONTROL_LINE = 65536
# accept() failing for want of fds or memory stays failing while the control socket is readable:
# stop watching it this long rather than spin, so the children that free the resources can run.
ACCEPT_BACKOFF = 0.5
# Accepts per wake-up: enough to drain a burst in a few rounds, few enough that children and
# signals are still looked at in between.
_ACCEPTS_PER_WAKEUP = 16
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# How often the listen queue is sampled (the status shows it; saturation is judged on it).
QUEUE_SAMPLE_INTERVAL = 0.1


@dataclass
class ControlConn:
    """A control connection still reading its request line."""

    sock: socket.socket
    deadline: float
    lines: control.LineBuffer = field(default_factory=lambda: control.LineBuffer(MAX_CONTROL_LINE))
    received: int = 0


@dataclass
class Child:
    gen_id: int
    pid: int
    channel: socket.socket
    output: int  # read end of the generation's stderr pipe
    proc: subprocess.Popen[bytes] | None = None
    lines: control.LineBuffer = field(default_factory=control.LineBuffer)
    tail: bytearray = field(default_factory=bytearray)
    exited: bool = False


@dataclass(frozen=True)
class InheritedGeneration:
    id: int
    pid: int
    channel: int  # fds, open across the exec
    output: int
    phase: str
    pids: list[int]
    workers: list[WorkerInfo]
    started_at: float | None = None  # wall clock (None: from an older engine)


@dataclass(frozen=True)
class ReexecState:
    """What a master hands its own next image in $REEXEC_ENV (JSON; the next image may be a newer
    engine, so the format only grows)."""

    listen: int
    handoff: tuple[int, int]
    control: int  # -1: none
    active: int | None
    next_id: int
    generations: list[InheritedGeneration]
    nproc: int | None = None
    unix_path: str | None = None
    status_pass: tuple[int, int] | None = None  # the status hand-over pair (receive, send)
    metrics: dict[str, Any] | None = None  # the policy's Metrics.to_wire()
    owns_listener: bool = True  # False: inherited from systemd or a web server
    status_listen: int = -1  # the status_listen socket (-1: none)
    held: list[int] = field(default_factory=list)  # connections taken and not yet read

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ReexecState:
        obj = json.loads(text)
        gens = []
        for g in obj["generations"]:
            try:
                workers = channel.workers_from_wire(g.get("workers", []))
            except channel.MessageError:
                workers = []  # the next status report fills them in
            gens.append(
                InheritedGeneration(
                    g["id"],
                    g["pid"],
                    g["channel"],
                    g["output"],
                    g["phase"],
                    g["pids"],
                    workers,
                    g.get("started_at"),
                )
            )
        send, recv = obj["handoff"]
        return cls(
            listen=obj["listen"],
            handoff=(send, recv),
            control=obj["control"],
            active=obj["active"],
            next_id=obj["next_id"],
            generations=gens,
            nproc=obj.get("nproc"),
            unix_path=obj.get("unix_path"),
            status_pass=tuple(obj["status_pass"]) if obj.get("status_pass") else None,
            metrics=obj.get("metrics"),
            owns_listener=bool(obj.get("owns_listener", True)),
            status_listen=int(obj.get("status_listen", -1)),
            held=[int(fd) for fd in obj.get("held", [])],
        )


class MasterLoop:
    def __init__(
        self,
        cfg: ServerConfig,
        listener: socket.socket,
        *,
        control_sock: socket.socket | None = None,
        ready_fd: int = -1,
        log_stream: Any = None,
        unix_path: str | None = None,
        owns_listener: bool = True,
        status_listener: socket.socket | None = None,
    ) -> None:
        self.cfg = cfg
        self.listener = listener
        # A listener we bound ourselves is ours to close on a stop; an inherited one is not.
        self.owns_listener = owns_listener
        # After StopAccepting: whether the workers serve the queue dry (the listener refuses
        # new connections), and whether the master's own copy is closed yet.
        self.serve_backlog = False
        self.listener_closed = False
        self.unix_identity = sockets.unix_socket_identity(unix_path) if unix_path else None
        self.control_sock = control_sock
        self.ready_fd = ready_fd
        self.log_stream = log_stream or sys.stderr
        # A unix socket we created (removed at exit, kept across a re-exec).
        self.unix_path = unix_path
        self.policy = P.MasterPolicy(
            P.Settings(
                name=cfg.name,
                nproc=cfg.nproc,
                boot_timeout=cfg.boot_timeout,
                graceful_timeout=cfg.graceful_timeout,
                listen=unix_path or sockets.describe(listener),
                pid=os.getpid(),
                drain_delay=cfg.drain_delay,
                status_listen=(
                    sockets.describe(status_listener) if status_listener is not None else None
                ),
            )
        )
        self.handoff_send, self.handoff_recv = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        # Workers pass requests for status_path here (fcgi_engine.status_pass); the master
        # answers them. Like the hand-off pair, it outlives generations and a re-exec.
        self.status_recv, self.status_send = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.listen_queue = ListenQueue(listener)
        self._stdout_fd: int | None = None  # see _stdout_copy
        self.queue_sampled_at = 0.0
        self.queue_waiting = 0  # consecutive samples with connections waiting
        self.queue_empty_samples = 0  # consecutive empty samples after StopAccepting
        # The master takes connections from the listener itself (see status_server).
        self.taking_over = False
        self.children: dict[int, Child] = {}
        self.sel = selectors.DefaultSelector()
        allow_list = AllowList(resolve_allowed_addrs(cfg).entries)
        self.status_server = StatusServer(
            cfg.name,
            cfg.status_path,
            lambda: self.policy.snapshot(time.monotonic()),
            self.sel,
            self.handoff_send,
            limits=Limits(max_params_size=cfg.max_params_size),
            params_timeout=cfg.params_timeout,
            send_timeout=cfg.send_timeout,
            allowed=None if allow_list.allows_any else allow_list,
        )
        self.http_status = (
            HttpStatusServer(
                status_listener,
                self.sel,
                lambda: self.policy.snapshot(time.monotonic()),
                self.policy.not_ready_reason,
            )
            if status_listener is not None
            else None
        )
        self.pending_signals: list[int] = []
        self.wakeup = WakeupPipe()
        self.exit_code: int | None = None
        # Every open control connection, by fd: those reading their request (ControlConn) and
        # those waiting for the policy's reply (None). All count towards MAX_CONTROL_CONNS.
        self.control_conns: dict[int, ControlConn | None] = {}
        self.accept_watched = False
        self.accept_paused_until = 0.0
        self.limited_log = RateLimitedLog(log)
        self.deferred_events: list[P.Event] = []
        self.reexec_requested = False
        # sd_notify: what systemd (Type=notify) is told; inert without $NOTIFY_SOCKET.
        self.service = ServiceReporter(Notifier.from_environment())

    # ------------------------------------------------------------ setup

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.pending_signals.append(signum)

    def install_signals(self) -> None:
        self.wakeup.install()
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def run(self, adopted: ReexecState | None = None) -> int:
        self.install_signals()
        self.sel.register(self.wakeup.read_fd, selectors.EVENT_READ, ("wake", None))
        self.status_recv.setblocking(False)
        self.sel.register(self.status_recv, selectors.EVENT_READ, ("status-pass", None))
        if self.control_sock is not None:
            self.control_sock.setblocking(False)
            self._watch_accept(time.monotonic())
        if self.http_status is not None:
            self.http_status.start()
        self.service.reexecuted = adopted is not None
        if adopted is not None:
            self._adopt(adopted)
        else:
            self._execute(self.policy.handle(P.Started(time.monotonic(), wall=time.time())))
        while self.exit_code is None:
            self.service.watchdog(time.monotonic())
            # The watchdog keeps its beat even when WatchdogSec is below the loop's 0.25 s wake-up.
            to_watchdog = self.service.seconds_to_watchdog(time.monotonic())
            wait = 0.25 if to_watchdog is None else min(0.25, to_watchdog)
            for key, _mask in self.sel.select(wait):
                kind, obj = key.data
                if kind == "wake":
                    self.wakeup.drain()
                elif kind == "control":
                    self._accept_control()
                elif kind == "ctl-conn":
                    self._read_control(obj)
                elif kind == "channel":
                    self._read_channel(obj)
                elif kind == "output":
                    self._read_output(obj)
                elif kind == "status-pass":
                    self.status_server.receive_passed(self.status_recv)
                elif kind == "status-conn":
                    if _mask & selectors.EVENT_WRITE:
                        self.status_server.writable(obj)
                    else:
                        self.status_server.readable(obj)
                elif kind == "listener":
                    self.status_server.accept_from(self.listener, _ACCEPTS_PER_WAKEUP)
                elif kind == "http-listen":
                    if self.http_status is not None:
                        self.http_status.accept()
                elif kind == "http-conn":
                    if self.http_status is not None:
                        self.http_status.ready(obj, _mask)
            now = time.monotonic()
            while self.pending_signals:
                self._execute(
                    self.policy.handle(P.SignalReceived(self.pending_signals.pop(0), now))
                )
            self._reap(now)
            self._execute(self.policy.handle(P.Tick(now)))
            self._sample_listen_queue(now)
            self.status_server.tick(now)
            if self.http_status is not None:
                self.http_status.tick(now)
            self._expire_control(now)
            self._watch_accept(now)
            self._report_to_service()
            self.limited_log.flush(now)
            if self.reexec_requested:
                self.reexec_requested = False
                self._reexec()
        return self.exit_code

    # ------------------------------------------------------------ generations

    def _spawn_failed(self, gen_id: int, error: str) -> None:
        """The generation never started: the policy sees a boot that failed and exited."""
        now = time.monotonic()
        self.deferred_events += [
            P.GenerationFailed(gen_id, now, error),
            P.GenerationExited(gen_id, now, 127),
        ]

    def _stdout_copy(self) -> int:
        """A descriptor of the master's stdout that generations inherit (-1: none)."""
        if self._stdout_fd is None:
            try:
                self._stdout_fd = os.dup(1)
            except OSError:
                self._stdout_fd = -1
        return self._stdout_fd

    def _spawn(self, gen_id: int, nproc: int) -> None:
        try:
            ours, theirs = socket.socketpair()
        except OSError as exc:
            self._spawn_failed(gen_id, f"cannot start generation {gen_id}: socketpair: {exc}")
            return
        try:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
        except OSError as exc:
            ours.close()
            theirs.close()
            self._spawn_failed(gen_id, f"cannot start generation {gen_id}: pipe: {exc}")
            return
        env = os.environ.copy()
        env.pop(REEXEC_ENV, None)
        # systemd's NOTIFY_SOCKET and watchdog are the master's: app code must not speak for it.
        child_environment(env)
        env.update({k: str(v) for k, v in self.cfg.environment.items()})
        # PYTHONPATH: an interpreter or virtualenv of the server's own (`python:`) may lack us.
        env = interpreter.with_package_path(env)
        env[ENV_KEY] = for_server(
            self.cfg,
            gen_id,
            nproc,
            listen_fd=self.listener.fileno(),
            channel_fd=theirs.fileno(),
            handoff_send_fd=self.handoff_send.fileno(),
            handoff_recv_fd=self.handoff_recv.fileno(),
            status_pass_fd=self.status_send.fileno(),
        ).to_json()
        # A generation's stdout and stderr are the pipe the master logs from; an access log
        # named `-` or /dev/stdout goes to a copy of the master's own stdout instead.
        stdout_copy = self._stdout_copy()
        if stdout_copy >= 0:
            env[logfile.STDOUT_FD_ENV] = str(stdout_copy)
        cwd = os.path.realpath(self.cfg.chdir) if self.cfg.chdir else None
        python = interpreter.python(self.cfg.python)
        try:
            proc = subprocess.Popen(
                [python, "-m", "fcgi_engine.serving", self.cfg.name],
                pass_fds=(
                    self.listener.fileno(),
                    theirs.fileno(),
                    self.handoff_send.fileno(),
                    self.handoff_recv.fileno(),
                    self.status_send.fileno(),
                    *([stdout_copy] if stdout_copy >= 0 else []),
                ),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=out_w,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            theirs.close()
            ours.close()
            os.close(out_r)
            os.close(out_w)
            self._spawn_failed(gen_id, f"cannot start {python}: {exc}")
            return
        theirs.close()
        os.close(out_w)
        self.deferred_events.append(
            P.GenerationSpawned(gen_id, time.monotonic(), cwd if self.cfg.chdir else None)
        )
        child = Child(gen_id, proc.pid, ours, out_r, proc)
        try:
            self._register_child(child)
        except OSError as exc:
            # Unwatched, it could never report ready: kill it; the reap reports its exit.
            self._kill_group(child)
            self.deferred_events.append(
                P.GenerationFailed(
                    gen_id, time.monotonic(), f"cannot watch generation {gen_id}: {exc}"
                )
            )

    def _register_child(self, child: Child) -> None:
        # In `children` first, so that whatever fails below, the reap still finds it.
        self.children[child.gen_id] = child
        child.channel.setblocking(False)
        os.set_blocking(child.output, False)
        self.sel.register(child.channel, selectors.EVENT_READ, ("channel", child))
        self.sel.register(child.output, selectors.EVENT_READ, ("output", child))

    def _read_channel(self, child: Child) -> None:
        try:
            data = child.channel.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._unregister(child.channel)
            return
        dropped = child.lines.dropped
        lines = child.lines.feed(data)
        now = time.monotonic()
        if child.lines.dropped > dropped:
            self._bad_channel_line(child, "a line over the length limit", now)
        for line in lines:
            try:
                msg = channel.decode(line)
            except channel.MessageError as exc:
                self._bad_channel_line(child, str(exc), now)
                continue
            ev: P.Event
            match msg:
                case channel.Ready(pids=pids, workers=workers, health=health):
                    ev = P.GenerationReady(
                        child.gen_id, now, pids, workers, health.to_wire() if health else None
                    )
                case channel.Failed(error=error, health=health):
                    ev = P.GenerationFailed(
                        child.gen_id, now, error, health.to_wire() if health else None
                    )
                case channel.Status(workers=workers, counts=counts, restarts=restarts):
                    ev = P.GenerationStatus(child.gen_id, now, workers, counts, restarts)
                case channel.Resize() | channel.Stop():
                    self._bad_channel_line(
                        child, f"a {type(msg).__name__} goes to a generation, not from it", now
                    )
                    continue
                case _:
                    unhandled(msg)
            self._execute(self.policy.handle(ev))

    def _bad_channel_line(self, child: Child, problem: str, now: float) -> None:
        self.limited_log(
            f"channel-{child.gen_id}",
            f"{self.cfg.name}: generation {child.gen_id} sent a message that was skipped: "
            f"{problem}",
            now,
            logging.WARNING,
        )

    def _read_output(self, child: Child) -> None:
        try:
            data = os.read(child.output, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._unregister(child.output)
            return
        child.tail += data
        if len(child.tail) > _TAIL:
            del child.tail[: len(child.tail) - _TAIL]
        try:
            self.log_stream.write(data.decode("utf-8", "replace"))
            self.log_stream.flush()
        except (OSError, ValueError):
            pass

    def _reap(self, now: float) -> None:
        for child in list(self.children.values()):
            try:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = child.pid, 0
            if pid == 0:
                continue
            if child.proc is not None:
                child.proc.returncode = os.waitstatus_to_exitcode(status)
            # Collect the last words before reporting the exit.
            while True:
                before = len(child.tail)
                self._read_output(child)
                if len(child.tail) == before:
                    break
            self._read_channel(child)
            self._close_child(child)
            code = os.waitstatus_to_exitcode(status)
            self._execute(
                self.policy.handle(
                    P.GenerationExited(
                        child.gen_id,
                        now,
                        code,
                        bytes(child.tail[-4000:]).decode("utf-8", "replace"),
                    )
                )
            )

    def _unregister(self, obj: Any) -> None:
        try:
            self.sel.unregister(obj)
        except (KeyError, ValueError):
            pass

    def _close_child(self, child: Child) -> None:
        self.children.pop(child.gen_id, None)
        for obj in (child.channel, child.output):
            self._unregister(obj)
        child.channel.close()
        try:
            os.close(child.output)
        except OSError:
            pass

    # ------------------------------------------------------------ control

    def _watch_accept(self, now: float) -> None:
        """Watch the control socket unless accepts are backing off or the slots are full."""
        if self.control_sock is None:
            return
        want = now >= self.accept_paused_until and (
            len(self.control_conns) < MAX_CONTROL_CONNS or self._oldest_reading() is not None
        )
        if want == self.accept_watched:
            return
        if not want:
            self._unregister(self.control_sock)
        else:
            try:
                self.sel.register(self.control_sock, selectors.EVENT_READ, ("control", None))
            except KeyError:
                pass  # already watched
            except (ValueError, OSError) as exc:
                # epoll_ctl can fail with ENOMEM/ENOSPC: try again next round.
                self.limited_log(
                    "ctl-watch", f"{self.cfg.name}: cannot watch the control socket: {exc}", now
                )
                return
        self.accept_watched = want

    def _oldest_reading(self) -> ControlConn | None:
        reading = [c for c in self.control_conns.values() if c is not None]
        return min(reading, key=lambda c: c.deadline) if reading else None

    def _accept_control(self) -> None:
        assert self.control_sock is not None
        for _ in range(_ACCEPTS_PER_WAKEUP):
            now = time.monotonic()
            full = len(self.control_conns) >= MAX_CONTROL_CONNS
            if full and self._oldest_reading() is None:
                # Every slot waits for a reply: the backlog holds the rest until one closes.
                break
            try:
                conn, _ = self.control_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    # Pending connections keep the socket readable: stop watching it for a while
                    # instead of spinning on the same error.
                    self.accept_paused_until = now + ACCEPT_BACKOFF
                    self._watch_accept(now)
                    self.limited_log(
                        "ctl-accept",
                        f"{self.cfg.name}: cannot accept control connections: {exc}; "
                        f"pausing them for {ACCEPT_BACKOFF:g} s",
                        now,
                    )
                elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    # Not a per-connection error: back off too rather than risk spinning.
                    self.accept_paused_until = now + ACCEPT_BACKOFF
                    self._watch_accept(now)
                    self.limited_log(
                        "ctl-accept-other",
                        f"{self.cfg.name}: control accept failed: {exc}",
                        now,
                    )
                return
            try:
                conn.setblocking(False)
                self.sel.register(conn, selectors.EVENT_READ, ("ctl-conn", conn))
            except OSError as exc:
                conn.close()
                self.limited_log(
                    "ctl-register",
                    f"{self.cfg.name}: cannot watch a control connection: {exc}",
                    now,
                )
                continue
            if full:
                oldest = self._oldest_reading()
                assert oldest is not None
                self.limited_log(
                    "ctl-full",
                    f"{self.cfg.name}: {MAX_CONTROL_CONNS} control connections open: closed "
                    "the oldest one yet to send its request, to take a new one",
                    now,
                    logging.WARNING,
                )
                self._close_control(oldest.sock)
            self.control_conns[conn.fileno()] = ControlConn(conn, now + CONTROL_REQUEST_TIMEOUT)
        self._watch_accept(time.monotonic())

    def _expire_control(self, now: float) -> None:
        for cc in [c for c in self.control_conns.values() if c is not None and now >= c.deadline]:
            # Rate-limited: a flood of idle connections expires in a burst.
            self.limited_log(
                "ctl-deadline",
                f"{self.cfg.name}: control connection closed: no complete request within "
                f"{CONTROL_REQUEST_TIMEOUT:g} s ({cc.received} bytes received)",
                now,
                logging.WARNING,
            )
            self._close_control(cc.sock)

    def _read_control(self, conn: socket.socket) -> None:
        cc = self.control_conns.get(conn.fileno())
        if cc is None:
            self._unregister(conn)
            return
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_control(conn)
            return
        cc.received += len(data)
        lines = cc.lines.feed(data)
        if cc.lines.dropped:
            log.warning(
                "%s: control connection closed: request line over %d bytes",
                self.cfg.name,
                MAX_CONTROL_LINE,
            )
            self._close_control(conn)
            return
        if not lines:
            return
        self._unregister(conn)
        # Still open (and counted) until the reply, which may come much later (graceful, stop).
        self.control_conns[conn.fileno()] = None
        now = time.monotonic()
        try:
            request = control.decode_request(lines[0])
        except control.MessageError as exc:
            self._reply(conn, control.ErrorResponse(f"bad control message: {exc}"))
            return
        ev: P.Event
        match request:
            case control.StatusRequest():
                ev = P.StatusRequested(now, conn)
            case control.RolloutRequest():
                ev = P.RolloutRequested(now, conn)
            case control.StopRequest(fast=fast):
                ev = P.StopRequested(now, fast, conn)
            case _:
                unhandled(request)
        self._execute(self.policy.handle(ev))

    def _close_control(self, conn: socket.socket) -> None:
        self._unregister(conn)
        self.control_conns.pop(conn.fileno(), None)
        conn.close()

    def _reply(self, conn: Any, response: control.Response) -> None:
        if not isinstance(conn, socket.socket):
            return
        data = control.encode(replace(response, pid=os.getpid()))
        try:
            # Never wait on a reader: a reply is small and fits the socket buffer of any client
            # that reads; one whose buffer is full loses its reply rather than stall the master.
            sent = conn.send(data, socket.MSG_DONTWAIT)
            if sent < len(data):
                log.warning(
                    "%s: control reply cut short (%d of %d bytes): the client is not reading",
                    self.cfg.name,
                    sent,
                    len(data),
                )
        except BlockingIOError:
            log.warning("%s: control reply dropped: the client is not reading", self.cfg.name)
        except OSError as exc:
            # Usually the client gave up (EPIPE, ECONNRESET): nothing to tell anyone.
            log.debug("%s: control reply not sent: %s", self.cfg.name, exc)
        finally:
            self._close_control(conn)

    # ------------------------------------------------------------ actions

    def _execute(self, actions: list[P.Action]) -> None:
        for action in actions:
            try:
                self._execute_one(action)
            except OSError as exc:
                # The backstop: an OS error in one action must neither skip the actions after it
                # (a reply, an exit) nor escape the loop and take the master and its socket down.
                self.limited_log(
                    "action-" + type(action).__name__,
                    f"{self.cfg.name}: {type(action).__name__} failed: {exc}",
                    time.monotonic(),
                )
        # Outcomes of these actions, handled once the list is done so the policy's decisions
        # are carried out in the order it made them.
        while self.deferred_events:
            self._execute(self.policy.handle(self.deferred_events.pop(0)))
        self._report_to_service()

    def _kill_group(self, child: Child) -> None:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except OSError as exc:
            log.error(
                "%s: cannot kill generation %d (pid %d): %s",
                self.cfg.name,
                child.gen_id,
                child.pid,
                exc,
            )

    def _execute_one(self, action: P.Action) -> None:
        match action:
            case P.SpawnGeneration(gen_id=gen_id, nproc=nproc):
                # Announced before it starts: a spawn that fails at once ends the rollout within
                # this same list, and RELOADING=1 must come before that READY=1.
                self._report_to_service()
                self._spawn(gen_id, nproc)
            case P.SignalGeneration(gen_id=gen_id, signum=signum):
                self._signal_generation(gen_id, signum)
            case P.ResizeGeneration(gen_id=gen_id, nproc=nproc):
                self._resize_generation(gen_id, nproc)
            case P.KillGeneration(gen_id=gen_id):
                child = self.children.get(gen_id)
                if child is not None:
                    self._kill_group(child)
            case P.Reply(reply_to=reply_to, payload=payload):
                self._reply(reply_to, payload)
            case P.NotifyStarted(ok=ok, message=message):
                self._notify(ok, message)
            case P.Log(level=level, message=message):
                getattr(log, level)(message)
            case P.ReopenLogs():
                self._reopen_logs()
            case P.StopAccepting():
                self._stop_accepting()
            case P.StopGeneration(gen_id=gen_id):
                self._stop_generation(gen_id)
            case P.ReExec():
                self.reexec_requested = True
            case P.Exit(code=code):
                self.exit_code = code
            case _:
                unhandled(action)

    def _signal_generation(self, gen_id: int, signum: int) -> None:
        child = self.children.get(gen_id)
        if child is None:
            return
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass
        except OSError as exc:
            log.error(
                "%s: cannot signal generation %d (pid %d) with %s: %s",
                self.cfg.name,
                child.gen_id,
                child.pid,
                signal.Signals(signum).name,
                exc,
            )

    def _stop_accepting(self) -> None:
        """Take no new connection on the listener from now on; those queued are still served
        (see the module docstring). The master stops taking connections itself."""
        self._take_over(False)
        self.queue_waiting = 0
        if not self.owns_listener:
            log.info(
                "%s: the listener is inherited: it stays open for whoever serves next",
                self.cfg.name,
            )
            return
        if self.unix_path is not None:
            # Unlinked first: a late connect fails at once (ENOENT), and nginx retries it.
            sockets.remove_unix_socket(self.unix_path, self.unix_identity)
            self.serve_backlog = True
        else:
            self.serve_backlog = sockets.refuse_new_connections(self.listener)
        if self.serve_backlog:
            log.info("%s: not accepting new connections; serving those queued", self.cfg.name)
        else:
            log.warning(
                "%s: cannot make %s refuse new connections: the workers stop accepting now, "
                "and connections still queued when the master exits are reset",
                self.cfg.name,
                self.policy.settings.listen,
            )

    def _stop_generation(self, gen_id: int) -> None:
        child = self.children.get(gen_id)
        if child is None:
            return
        try:
            # Before the signal, so the generation has read it when the signal wakes it.
            child.channel.sendall(channel.encode(channel.Stop(serve_backlog=self.serve_backlog)))
        except OSError as exc:
            log.error("%s: cannot tell generation %d to stop: %s", self.cfg.name, child.gen_id, exc)
        self._signal_generation(gen_id, signal.SIGTERM)

    def _close_listener_when_served(self, waiting: int | None) -> None:
        """Close the master's copy of the listener once its queue is seen empty twice in a row
        after StopAccepting (the workers hold theirs until they see it empty too)."""
        if not self.serve_backlog or self.listener_closed:
            return
        if waiting is None or waiting > 0:
            self.queue_empty_samples = 0
            return
        self.queue_empty_samples += 1
        if self.queue_empty_samples >= 2:
            self.listen_queue.close()
            self.listener.close()
            self.listener_closed = True
            log.info("%s: listen queue served; the master closed the listener", self.cfg.name)

    def _resize_generation(self, gen_id: int, nproc: int) -> None:
        child = self.children.get(gen_id)
        if child is None:
            return
        try:
            # Non-blocking, and a few bytes: it fits unless the generation stopped reading its
            # channel, and then it is too wedged to resize anyway.
            child.channel.sendall(channel.encode(channel.Resize(nproc)))
        except OSError as exc:
            log.error(
                "%s: cannot tell generation %d to run %d workers: %s",
                self.cfg.name,
                child.gen_id,
                nproc,
                exc,
            )

    def _notify(self, ok: bool, message: str) -> None:
        if self.ready_fd < 0:
            return
        try:
            os.write(self.ready_fd, (("ok " if ok else "fail ") + message + "\n").encode())
        except OSError:
            pass  # the parent waiting on `serve --daemon` is gone: nobody to tell
        finally:
            os.close(self.ready_fd)
            self.ready_fd = -1

    def _report_to_service(self) -> None:
        """Tell systemd what changed (sd_notify): ready, reloading, rolled out or back, stopping."""
        if not self.service.enabled:
            return
        policy = self.policy
        serving = policy.generations.get(policy.active) if policy.active is not None else None
        workers = serving.workers if serving is not None else []
        last = policy.last_rollout
        self.service.observe(
            ServiceState(
                ready=policy.started_ok,
                serving=policy.active,
                booting=policy.booting,
                stopping=policy.stopping,
                workers=len(workers),
                busy=sum(w.state == "busy" for w in workers),
                requests=sum(w.requests for w in workers),
                last_boot=RolloutOutcome(last.to_gen, last.ok, last.error) if last else None,
            ),
            time.monotonic(),
        )

    def _reopen_logs(self) -> None:
        path = self.cfg.error_log
        if not path:
            return
        try:
            redirect_stderr(path)
        except OSError as exc:
            # Keep logging to the file already open: a log not rotated beats a master gone.
            log.error(
                "%s: cannot reopen %s, still logging to the old file: %s", self.cfg.name, path, exc
            )
            return
        log.info("%s: reopened %s", self.cfg.name, path)

    # ------------------------------------------------------------ the listen queue

    def _sample_listen_queue(self, now: float) -> None:
        """Measure the accept queue, and take connections from it while it stays non-empty
        and every worker is busy (so the status page answers even then; see status_server)."""
        if now - self.queue_sampled_at < QUEUE_SAMPLE_INTERVAL or self.listener_closed:
            return
        self.queue_sampled_at = now
        waiting, limit = self.listen_queue.sample()
        # Connections the master took from the queue to look at still wait for a worker.
        shown = waiting + self.status_server.held() if waiting is not None else None
        self._execute(self.policy.handle(P.ListenQueueSampled(now, shown, limit)))
        if self.policy.accepting_stopped:
            # The workers serve the queue now; connections the master took count as queued.
            self._take_over(False)
            self._close_listener_when_served(shown)
            return
        self.queue_waiting = self.queue_waiting + 1 if waiting else 0
        self._take_over(self.queue_waiting >= 2 and self._workers_all_busy())

    def _workers_all_busy(self) -> bool:
        active = self.policy.generations.get(self.policy.active or 0)
        return active is not None and all(w.state != "idle" for w in active.workers)

    def _take_over(self, want: bool) -> None:
        # Python servers only: a `command:` program may block in accept() on the shared socket,
        # and making it non-blocking would break it. And only with a status page to answer.
        want = want and not self.cfg.command and self.cfg.status_path is not None
        if want == self.taking_over:
            return
        if want:
            # The workers made it non-blocking already (one open file shared by all).
            self.listener.setblocking(False)
            self.sel.register(self.listener, selectors.EVENT_READ, ("listener", None))
            # DEBUG: under saturation this switches on and off every time the queue drains.
            log.debug(
                "%s: every worker is busy and connections wait: the master looks at them",
                self.cfg.name,
            )
        else:
            self._unregister(self.listener)
        self.taking_over = want

    # ------------------------------------------------------------ re-exec in place

    def _reexec(self) -> None:
        """Become a fresh master image (same pid), keeping the socket and the generations.
        The policy decided it is time (no rollout boots, no stop runs)."""
        keep = [self.listener.fileno(), self.handoff_send.fileno(), self.handoff_recv.fileno()]
        keep += [self.status_recv.fileno(), self.status_send.fileno()]
        # Connections taken from the listener and not yet read go to the next image (they are
        # requests waiting for a worker); status answers in progress are dropped (a status
        # page is asked again).
        held = self.status_server.release_untouched()
        keep += [sock.fileno() for sock in held]
        self.status_server.close_all()
        status_listen = -1
        if self.http_status is not None:
            self.http_status.close_connections()
            status_listen = self.http_status.listener.fileno()
            keep.append(status_listen)
        if self.control_sock is not None:
            keep.append(self.control_sock.fileno())
        gens = []
        for child in self.children.values():
            rec = self.policy.generations.get(child.gen_id)
            keep += [child.channel.fileno(), child.output]
            gens.append(
                InheritedGeneration(
                    id=child.gen_id,
                    pid=child.pid,
                    channel=child.channel.fileno(),
                    output=child.output,
                    phase=rec.phase.value if rec else P.Phase.DRAINING.value,
                    pids=rec.pids if rec else [],
                    workers=rec.workers if rec else [],
                    started_at=self.policy.wall(rec.started) if rec else None,
                )
            )
        for fd in keep:
            os.set_inheritable(fd, True)
        state = ReexecState(
            listen=self.listener.fileno(),
            handoff=(self.handoff_send.fileno(), self.handoff_recv.fileno()),
            control=self.control_sock.fileno() if self.control_sock is not None else -1,
            active=self.policy.active,
            next_id=self.policy.next_id,
            generations=gens,
            nproc=self.policy.nproc,
            unix_path=self.unix_path,
            status_pass=(self.status_recv.fileno(), self.status_send.fileno()),
            metrics=self.policy.metrics.to_wire(),
            held=[sock.fileno() for sock in held],
            owns_listener=self.owns_listener,
            status_listen=status_listen,
        )
        os.environ[REEXEC_ENV] = state.to_json()
        argv = [sys.executable, *sys.orig_argv[1:]] if hasattr(sys, "orig_argv") else sys.argv
        signal.set_wakeup_fd(-1)
        log.info("%s: exec %s", self.cfg.name, " ".join(argv))
        try:
            os.execv(sys.executable, argv)
        except OSError as exc:
            del os.environ[REEXEC_ENV]
            self.wakeup.install()
            log.error("%s: re-exec failed (%s); carrying on", self.cfg.name, exc)

    def _adopt(self, state: ReexecState) -> None:
        self.handoff_send.close()
        self.handoff_recv.close()
        self.handoff_send = socket.socket(fileno=state.handoff[0])
        self.handoff_recv = socket.socket(fileno=state.handoff[1])
        self.status_server.handoff_send = self.handoff_send
        if state.status_pass is not None:
            self._unregister(self.status_recv)
            self.status_recv.close()
            self.status_send.close()
            self.status_recv = socket.socket(fileno=state.status_pass[0])
            self.status_send = socket.socket(fileno=state.status_pass[1])
            self.status_recv.setblocking(False)
            self.sel.register(self.status_recv, selectors.EVENT_READ, ("status-pass", None))
            for fd in state.status_pass:
                os.set_inheritable(fd, False)
        for fd in state.held:
            os.set_inheritable(fd, False)
            self.status_server.adopt_untouched(socket.socket(fileno=fd))
        adopted = []
        for g in state.generations:
            child = Child(g.id, g.pid, socket.socket(fileno=g.channel), g.output)
            self._register_child(child)
            os.set_inheritable(g.channel, False)
            os.set_inheritable(g.output, False)
            adopted.append(
                P.AdoptedGeneration(g.id, P.Phase(g.phase), g.pids, g.workers, g.started_at)
            )
        for fd in (self.listener.fileno(), self.handoff_send.fileno(), self.handoff_recv.fileno()):
            os.set_inheritable(fd, False)
        event = P.Adopted(
            time.monotonic(),
            adopted,
            active=state.active,
            next_id=state.next_id,
            nproc=state.nproc if state.nproc is not None else self.policy.nproc,
            wall=time.time(),
            metrics=state.metrics,
        )
        actions = self.policy.handle(event)
        log.info(
            "%s: master re-executed (pid %d), adopted generation %s",
            self.cfg.name,
            os.getpid(),
            self.policy.active,
        )
        self._execute(actions)
