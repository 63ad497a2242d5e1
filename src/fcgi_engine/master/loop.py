"""The master's I/O shell: turns signals, children and control requests into policy events and
carries the policy's actions out. It holds the listening socket for its whole life."""

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
from dataclasses import dataclass, field
from typing import Any

from fcgi_engine import control
from fcgi_engine.config.generation import ENV_KEY, for_server
from fcgi_engine.config.settings import ServerConfig
from fcgi_engine.master import policy as P
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
# Resource errors repeat while the shortage lasts: one log line per kind per interval, with a count.
RESOURCE_LOG_INTERVAL = 10.0
# Accepts per wake-up: enough to drain a burst in a few rounds, few enough that children and
# signals are still looked at in between.
_ACCEPTS_PER_WAKEUP = 16
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass
class ControlConn:
    """A control connection still reading its request line."""

    sock: socket.socket
    deadline: float
    buf: bytes = b""


class RateLimitedLog:
    """One log line per key per interval; the occurrences in between are counted, not lost."""

    def __init__(self, interval: float = RESOURCE_LOG_INTERVAL) -> None:
        self.interval = interval
        self.last: dict[str, float] = {}
        self.pending: dict[str, tuple[int, str, int]] = {}

    def __call__(self, key: str, message: str, now: float, level: int = logging.ERROR) -> None:
        last = self.last.get(key)
        if last is not None and now - last < self.interval:
            count, _, _ = self.pending.get(key, (0, "", level))
            self.pending[key] = (count + 1, message, level)
            return
        self.last[key] = now
        log.log(level, "%s", message)

    def flush(self, now: float) -> None:
        """Report what was held back once its interval is over, even if it does not recur."""
        for key, (count, message, level) in list(self.pending.items()):
            if now - self.last.get(key, 0.0) >= self.interval:
                del self.pending[key]
                self.last[key] = now
                log.log(
                    level,
                    "%s (%d more time%s in the last %g s)",
                    message,
                    count,
                    "" if count == 1 else "s",
                    self.interval,
                )


@dataclass
class Child:
    gen_id: int
    pid: int
    channel: socket.socket
    output: int  # read end of the generation's stderr pipe
    proc: subprocess.Popen[bytes] | None = None
    buf: bytes = b""
    tail: bytearray = field(default_factory=bytearray)
    exited: bool = False


class MasterLoop:
    def __init__(
        self,
        cfg: ServerConfig,
        listener: socket.socket,
        *,
        control_sock: socket.socket | None = None,
        ready_fd: int = -1,
        log_stream: Any = None,
    ) -> None:
        self.cfg = cfg
        self.listener = listener
        self.control_sock = control_sock
        self.ready_fd = ready_fd
        self.log_stream = log_stream or sys.stderr
        self.policy = P.MasterPolicy(
            P.Settings(
                name=cfg.name,
                nproc=cfg.nproc,
                boot_timeout=cfg.boot_timeout,
                graceful_timeout=cfg.graceful_timeout,
            )
        )
        self.handoff_send, self.handoff_recv = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.children: dict[int, Child] = {}
        self.sel = selectors.DefaultSelector()
        self.pending_signals: list[int] = []
        self.wakeup = WakeupPipe()
        self.exit_code: int | None = None
        # Every open control connection, by fd: those reading their request (ControlConn) and
        # those waiting for the policy's reply (None). All count towards MAX_CONTROL_CONNS.
        self.control_conns: dict[int, ControlConn | None] = {}
        self.accept_watched = False
        self.accept_paused_until = 0.0
        self.limited_log = RateLimitedLog()
        self.deferred_events: list[P.Event] = []
        self.reexec_requested = False
        self.unix_path: str | None = None

    # ------------------------------------------------------------ setup

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.pending_signals.append(signum)

    def install_signals(self) -> None:
        self.wakeup.install()
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def run(self, adopted: dict[str, Any] | None = None) -> int:
        self.install_signals()
        self.sel.register(self.wakeup.read_fd, selectors.EVENT_READ, ("wake", None))
        if self.control_sock is not None:
            self.control_sock.setblocking(False)
            self._watch_accept(time.monotonic())
        if adopted:
            self._adopt(adopted)
        else:
            self._execute(self.policy.handle(P.Started(time.monotonic())))
        while self.exit_code is None:
            for key, _mask in self.sel.select(0.25):
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
            now = time.monotonic()
            while self.pending_signals:
                self._execute(
                    self.policy.handle(P.SignalReceived(self.pending_signals.pop(0), now))
                )
            self._reap(now)
            self._execute(self.policy.handle(P.Tick(now)))
            self._expire_control(now)
            self._watch_accept(now)
            self.limited_log.flush(now)
            if self.reexec_requested:
                self.reexec_requested = False
                self._reexec()
        return self.exit_code

    # ------------------------------------------------------------ generations

    def _python(self) -> str:
        python = self.cfg.python
        if not python:
            return sys.executable
        if os.path.isdir(python):
            return os.path.join(python, "bin", "python")
        return python

    def _spawn_failed(self, gen_id: int, error: str) -> None:
        """The generation never started: the policy sees a boot that failed and exited."""
        now = time.monotonic()
        self.deferred_events += [
            P.GenerationFailed(gen_id, now, error),
            P.GenerationExited(gen_id, now, 127),
        ]

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
        env.update({k: str(v) for k, v in self.cfg.environment.items()})
        env[ENV_KEY] = for_server(
            self.cfg,
            gen_id,
            nproc,
            listen_fd=self.listener.fileno(),
            channel_fd=theirs.fileno(),
            handoff_send_fd=self.handoff_send.fileno(),
            handoff_recv_fd=self.handoff_recv.fileno(),
        ).to_json()
        # The directory holding the fcgi_engine package, so an interpreter or virtualenv of the
        # server's own (`python:`) that lacks it can still boot generations.
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (env.get("PYTHONPATH", ""), package_root) if p
        )
        cwd = os.path.realpath(self.cfg.chdir) if self.cfg.chdir else None
        try:
            proc = subprocess.Popen(
                [self._python(), "-m", "fcgi_engine.serving", self.cfg.name],
                pass_fds=(
                    self.listener.fileno(),
                    theirs.fileno(),
                    self.handoff_send.fileno(),
                    self.handoff_recv.fileno(),
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
            self._spawn_failed(gen_id, f"cannot start {self._python()}: {exc}")
            return
        theirs.close()
        os.close(out_w)
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
        messages, child.buf = control.split_messages(child.buf + data)
        now = time.monotonic()
        for msg in messages:
            kind = msg.get("event")
            if kind == "ready":
                ev: P.Event = P.GenerationReady(
                    child.gen_id, now, msg.get("pids", []), msg.get("workers", [])
                )
            elif kind == "failed":
                ev = P.GenerationFailed(child.gen_id, now, str(msg.get("error", "")))
            elif kind == "status":
                ev = P.GenerationStatus(child.gen_id, now, msg.get("workers", []))
            else:
                continue
            self._execute(self.policy.handle(ev))

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
                f"{CONTROL_REQUEST_TIMEOUT:g} s ({len(cc.buf)} bytes received)",
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
        cc.buf += data
        if b"\n" not in cc.buf:
            if len(cc.buf) > MAX_CONTROL_LINE:
                log.warning(
                    "%s: control connection closed: request line over %d bytes",
                    self.cfg.name,
                    MAX_CONTROL_LINE,
                )
                self._close_control(conn)
            return
        line = cc.buf.split(b"\n", 1)[0]
        self._unregister(conn)
        # Still open (and counted) until the reply, which may come much later (graceful, stop).
        self.control_conns[conn.fileno()] = None
        now = time.monotonic()
        try:
            msg = control.decode(line)
        except ValueError as exc:
            self._reply(conn, {"ok": False, "error": f"bad control message: {exc}"})
            return
        cmd = msg.get("cmd")
        if cmd == "status":
            ev: P.Event = P.StatusRequested(now, conn)
        elif cmd == "graceful":
            ev = P.RolloutRequested(now, conn)
        elif cmd == "stop":
            ev = P.StopRequested(now, bool(msg.get("fast")), conn)
        else:
            self._reply(conn, {"ok": False, "error": f"unknown command {cmd!r}"})
            return
        self._execute(self.policy.handle(ev))

    def _close_control(self, conn: socket.socket) -> None:
        self._unregister(conn)
        self.control_conns.pop(conn.fileno(), None)
        conn.close()

    def _reply(self, conn: Any, payload: dict[str, Any]) -> None:
        if not isinstance(conn, socket.socket):
            return
        payload.setdefault("pid", os.getpid())
        data = control.encode(payload)
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
        if isinstance(action, P.SpawnGeneration):
            self._spawn(action.gen_id, action.nproc)
        elif isinstance(action, P.SignalGeneration):
            child = self.children.get(action.gen_id)
            if child is not None:
                try:
                    os.kill(child.pid, action.signum)
                except ProcessLookupError:
                    pass
                except OSError as exc:
                    log.error(
                        "%s: cannot signal generation %d (pid %d) with %s: %s",
                        self.cfg.name,
                        child.gen_id,
                        child.pid,
                        signal.Signals(action.signum).name,
                        exc,
                    )
        elif isinstance(action, P.ResizeGeneration):
            child = self.children.get(action.gen_id)
            if child is not None:
                try:
                    # Non-blocking, and a few bytes: it fits unless the generation stopped
                    # reading its channel, and then it is too wedged to resize anyway.
                    child.channel.sendall(control.encode({"cmd": "nproc", "n": action.nproc}))
                except OSError as exc:
                    log.error(
                        "%s: cannot tell generation %d to run %d workers: %s",
                        self.cfg.name,
                        child.gen_id,
                        action.nproc,
                        exc,
                    )
        elif isinstance(action, P.KillGeneration):
            child = self.children.get(action.gen_id)
            if child is not None:
                self._kill_group(child)
        elif isinstance(action, P.Reply):
            self._reply(action.reply_to, dict(action.payload))
        elif isinstance(action, P.NotifyStarted):
            self._notify(action.ok, action.message)
        elif isinstance(action, P.Log):
            getattr(log, action.level)(action.message)
        elif isinstance(action, P.ReopenLogs):
            self._reopen_logs()
        elif isinstance(action, P.ReExec):
            self.reexec_requested = True
        elif isinstance(action, P.Exit):
            self.exit_code = action.code

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

    def _reopen_logs(self) -> None:
        path = self.cfg.error_log
        if not path:
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            # Keep logging to the file already open: a log not rotated beats a master gone.
            log.error(
                "%s: cannot reopen %s, still logging to the old file: %s", self.cfg.name, path, exc
            )
            return
        try:
            os.dup2(fd, 2)
        finally:
            os.close(fd)
        log.info("%s: reopened %s", self.cfg.name, path)

    # ------------------------------------------------------------ re-exec in place

    def _reexec(self) -> None:
        """Become a fresh master image (same pid), keeping the socket and the generations."""
        if self.policy.booting is not None:
            log.warning("%s: re-exec postponed: a rollout is running", self.cfg.name)
            return
        keep = [self.listener.fileno(), self.handoff_send.fileno(), self.handoff_recv.fileno()]
        if self.control_sock is not None:
            keep.append(self.control_sock.fileno())
        gens = []
        for child in self.children.values():
            rec = self.policy.generations.get(child.gen_id)
            keep += [child.channel.fileno(), child.output]
            gens.append(
                {
                    "id": child.gen_id,
                    "pid": child.pid,
                    "channel": child.channel.fileno(),
                    "output": child.output,
                    "phase": rec.phase.value if rec else "draining",
                    "pids": rec.pids if rec else [],
                    "workers": rec.workers if rec else [],
                }
            )
        for fd in keep:
            os.set_inheritable(fd, True)
        state = {
            "listen": self.listener.fileno(),
            "handoff": [self.handoff_send.fileno(), self.handoff_recv.fileno()],
            "control": self.control_sock.fileno() if self.control_sock is not None else -1,
            "active": self.policy.active,
            "next_id": self.policy.next_id,
            "generations": gens,
            "nproc": self.policy.nproc,
            "unix_path": self.unix_path,
        }
        os.environ[REEXEC_ENV] = json.dumps(state)
        argv = [sys.executable, *sys.orig_argv[1:]] if hasattr(sys, "orig_argv") else sys.argv
        signal.set_wakeup_fd(-1)
        log.info("%s: exec %s", self.cfg.name, " ".join(argv))
        try:
            os.execv(sys.executable, argv)
        except OSError as exc:
            del os.environ[REEXEC_ENV]
            self.wakeup.install()
            log.error("%s: re-exec failed (%s); carrying on", self.cfg.name, exc)

    def _adopt(self, state: dict[str, Any]) -> None:
        self.handoff_send.close()
        self.handoff_recv.close()
        self.handoff_send = socket.socket(fileno=state["handoff"][0])
        self.handoff_recv = socket.socket(fileno=state["handoff"][1])
        now = time.monotonic()
        pol = self.policy
        pol.started_at = now
        pol.started_ok = True
        pol.next_id = state["next_id"]
        pol.nproc = state.get("nproc", pol.nproc)
        for g in state["generations"]:
            child = Child(g["id"], g["pid"], socket.socket(fileno=g["channel"]), g["output"])
            self._register_child(child)
            os.set_inheritable(g["channel"], False)
            os.set_inheritable(g["output"], False)
            phase = P.Phase(g["phase"])
            pol.generations[g["id"]] = P.GenerationRecord(
                g["id"],
                phase,
                now,
                deadline=now + self.cfg.graceful_timeout,
                pids=g["pids"],
                workers=g["workers"],
                ready_at=now,
            )
        pol.active = state["active"] if state["active"] in pol.generations else None
        for fd in (self.listener.fileno(), self.handoff_send.fileno(), self.handoff_recv.fileno()):
            os.set_inheritable(fd, False)
        log.info(
            "%s: master re-executed (pid %d), adopted generation %s",
            self.cfg.name,
            os.getpid(),
            pol.active,
        )
        if pol.active is None:
            self._execute(pol._spawn(now))
