"""The master's I/O shell: turns signals, children and control requests into policy events and
carries the policy's actions out. It holds the listening socket for its whole life."""

from __future__ import annotations

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
        self.control_conns: dict[int, bytes] = {}
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
            self.sel.register(self.control_sock, selectors.EVENT_READ, ("control", None))
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

    def _spawn(self, gen_id: int, nproc: int) -> None:
        ours, theirs = socket.socketpair()
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
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
            self._execute(
                self.policy.handle(
                    P.GenerationFailed(
                        gen_id, time.monotonic(), f"cannot start {self._python()}: {exc}"
                    )
                )
            )
            self._execute(self.policy.handle(P.GenerationExited(gen_id, time.monotonic(), 127)))
            return
        theirs.close()
        os.close(out_w)
        child = Child(gen_id, proc.pid, ours, out_r, proc)
        self._register_child(child)

    def _register_child(self, child: Child) -> None:
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

    def _accept_control(self) -> None:
        assert self.control_sock is not None
        try:
            conn, _ = self.control_sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        self.control_conns[conn.fileno()] = b""
        self.sel.register(conn, selectors.EVENT_READ, ("ctl-conn", conn))

    def _read_control(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        fd = conn.fileno()
        if not data:
            self._drop_control(conn)
            return
        buf = self.control_conns.get(fd, b"") + data
        if b"\n" not in buf:
            if len(buf) > 65536:
                self._drop_control(conn)
            else:
                self.control_conns[fd] = buf
            return
        line = buf.split(b"\n", 1)[0]
        self._unregister(conn)
        self.control_conns.pop(fd, None)
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

    def _drop_control(self, conn: socket.socket) -> None:
        self._unregister(conn)
        self.control_conns.pop(conn.fileno(), None)
        conn.close()

    def _reply(self, conn: Any, payload: dict[str, Any]) -> None:
        if not isinstance(conn, socket.socket):
            return
        payload.setdefault("pid", os.getpid())
        try:
            conn.setblocking(True)
            conn.settimeout(2.0)
            conn.sendall(control.encode(payload))
        except OSError:
            pass
        finally:
            conn.close()

    # ------------------------------------------------------------ actions

    def _execute(self, actions: list[P.Action]) -> None:
        for action in actions:
            if isinstance(action, P.SpawnGeneration):
                self._spawn(action.gen_id, action.nproc)
            elif isinstance(action, P.SignalGeneration):
                child = self.children.get(action.gen_id)
                if child is not None:
                    try:
                        os.kill(child.pid, action.signum)
                    except ProcessLookupError:
                        pass
            elif isinstance(action, P.ResizeGeneration):
                child = self.children.get(action.gen_id)
                if child is not None:
                    try:
                        child.channel.sendall(control.encode({"cmd": "nproc", "n": action.nproc}))
                    except OSError:
                        pass
            elif isinstance(action, P.KillGeneration):
                child = self.children.get(action.gen_id)
                if child is not None:
                    try:
                        os.killpg(child.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
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
            os.close(self.ready_fd)
        except OSError:
            pass
        self.ready_fd = -1

    def _reopen_logs(self) -> None:
        path = self.cfg.error_log
        if not path:
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        os.dup2(fd, 2)
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
