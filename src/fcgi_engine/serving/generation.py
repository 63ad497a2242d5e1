"""A generation: a fresh interpreter that imports the app once, proves it, and forks workers.

The master execs `python -m fcgi_engine.serving` with the listening socket, the hand-off socket
and its end of a channel socketpair. Over the channel the generation reports `failed` (with the
error text), `ready` and periodic `status`; end-of-file on it means the master is gone, and the
generation then stops its workers rather than serve on as an orphan.

Signals from the master: HUP drains with connection hand-off (a rollout), TERM drains and closes
(a stop), QUIT/INT stop at once, TTIN/TTOU add or remove a worker.

Until every worker has proven itself (imported the app and answered the health check over its
private connection), no worker takes a live request: they are told to go live (SIGUSR2) only
then, and the generation reports ready in the same step.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import signal
import socket
import sys
import time
import traceback
from typing import Any

from fcgi_engine import control
from fcgi_engine.config.address import LOOPBACK, AllowList
from fcgi_engine.config.generation import ENV_KEY, GenerationConfig
from fcgi_engine.protocol import Limits
from fcgi_engine.serving import slots as rules
from fcgi_engine.serving.loader import AppLoadError, WSGIApp, load_app
from fcgi_engine.serving.scoreboard import Scoreboard
from fcgi_engine.serving.slots import Slot as _Slot
from fcgi_engine.serving.worker import Worker, WorkerOptions
from fcgi_engine.system.wakeup import WakeupPipe

log = logging.getLogger("fcgi_engine.generation")

MAX_WORKERS = 256


class Generation:
    def __init__(self, app: WSGIApp, cfg: GenerationConfig, channel: socket.socket) -> None:
        self.app = app
        self.cfg = cfg
        self.channel = channel
        self.listener = socket.socket(fileno=cfg.listen_fd)
        self.handoff_send = (
            socket.socket(fileno=cfg.handoff_send_fd) if cfg.handoff_send_fd >= 0 else None
        )
        self.handoff_recv = (
            socket.socket(fileno=cfg.handoff_recv_fd) if cfg.handoff_recv_fd >= 0 else None
        )
        self.board = Scoreboard(MAX_WORKERS)
        self.slots: list[_Slot] = []
        self.mode = "serving"  # serving | draining | stopping
        self.drain_deadline = 0.0
        self.signals: list[int] = []
        self.channel_buf = b""
        self.wakeup = WakeupPipe()
        # Workers forked before the whole generation proved itself wait for SIGUSR2; those
        # forked after (replacements, TTIN) start live.
        self.proven = False
        self.last_spawn = 0.0
        self.access_fd = -1
        allowed = AllowList(cfg.allowed_addrs or list(LOOPBACK))
        self.options = WorkerOptions(
            limits=Limits(
                max_params_size=cfg.max_params_bytes, max_conns=cfg.nproc, max_reqs=cfg.nproc
            ),
            max_body_size=cfg.max_body_size,
            max_requests=cfg.max_requests,
            script_name=cfg.script_name,
            allowed=None if allowed.allows_any else allowed,
            access_log=cfg.access_log,
            params_timeout=cfg.params_timeout,
            body_timeout=cfg.body_timeout,
            body_min_rate=cfg.body_min_rate,
            idle_timeout=cfg.idle_timeout,
            send_timeout=cfg.send_timeout,
            worker_connections=cfg.worker_connections,
            body_buffer_size=cfg.body_buffer_size,
        )

    def open_logs(self) -> None:
        """Open the access log here, as the app's user, so a failure is the rollout's error."""
        if self.cfg.access_log:
            self.access_fd = os.open(
                self.cfg.access_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640
            )

    # ------------------------------------------------------------ reporting

    def report(self, **event: Any) -> None:
        try:
            self.channel.sendall(control.encode(event))
        except OSError:
            pass

    def status(self) -> list[dict[str, Any]]:
        workers = []
        for slot in self.slots:
            if not slot.pid:
                continue
            state = self.board.read(slot.index)
            workers.append(
                {
                    "pid": slot.pid,
                    "state": "busy" if state.busy else "idle",
                    "requests": state.requests,
                    "started": slot.started,
                }
            )
        return workers

    # ------------------------------------------------------------ workers

    def spawn(self, slot: _Slot, private: socket.socket | None = None) -> None:
        now = time.monotonic()
        self.board.reset(slot.index, 0, now)
        self.last_spawn = now
        max_requests = self.cfg.max_requests
        if max_requests and self.cfg.max_requests_jitter:
            max_requests += random.randint(0, self.cfg.max_requests_jitter)
        pid = os.fork()
        if pid == 0:
            self._become_worker(slot, private, max_requests)
        slot.pid = pid
        slot.started = now
        self.board.set_pid(slot.index, pid)

    def _become_worker(self, slot: _Slot, private: socket.socket | None, max_requests: int) -> None:
        code = 0
        try:
            # A generation that dies (killed from outside) leaves its workers to drain with
            # hand-off, as in a rollout: the master boots the next one at once.
            _set_parent_death_signal(signal.SIGHUP)
            self.channel.close()
            self.wakeup.close()
            options = self.options
            if max_requests != options.max_requests:
                options = WorkerOptions(**{**options.__dict__, "max_requests": max_requests})
            worker = Worker(
                self.app,
                self.listener,
                options,
                handoff_send=self.handoff_send,
                handoff_recv=self.handoff_recv,
                private=private,
                scoreboard=self.board,
                slot=slot.index,
                live=self.proven,
                access_fd=self.access_fd,
            )
            worker.install_signals()
            worker.run()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stderr.flush()
            os._exit(code)

    def boot(self) -> None:
        """Fork the workers and prove each one answers; report ready or failed."""
        deadline = time.monotonic() + self.cfg.boot_timeout
        # What the import built is shared by every worker: keep the collector from walking
        # (and so copying) those pages in each of them.
        gc.collect()
        gc.freeze()
        privates = []
        for index in range(self.cfg.nproc):
            slot = _Slot(index)
            self.slots.append(slot)
            ours, theirs = socket.socketpair()
            self.spawn(slot, theirs)
            theirs.close()
            privates.append(ours)
        from fcgi_engine.client import ClientError, get_values, request

        for slot, sock in zip(self.slots, privates, strict=True):
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                if self.cfg.health:
                    response = request(sock, self.cfg.health, keep_conn=True)
                    if not 200 <= response.status < 300:
                        body = response.body[:2000].decode("utf-8", "replace")
                        raise ClientError(
                            f"health check {self.cfg.health} answered {response.status} "
                            f"{response.reason}: {body}"
                        )
                else:
                    get_values(sock, ["FCGI_MPXS_CONNS"])
            except (ClientError, OSError) as exc:
                self.report(event="failed", error=f"worker {slot.pid}: {exc}")
                self.stop_workers(signal.SIGKILL)
                raise SystemExit(1) from None
            finally:
                sock.close()
        # Proven, all of them: only now may any of them take a live request.
        self.proven = True
        for slot in self.slots:
            if slot.pid:
                try:
                    os.kill(slot.pid, signal.SIGUSR2)
                except ProcessLookupError:
                    pass
        self.report(event="ready", pids=[s.pid for s in self.slots], workers=self.status())

    def stop_workers(self, sig: int) -> None:
        for slot in self.slots:
            if slot.pid:
                try:
                    os.kill(slot.pid, sig)
                except ProcessLookupError:
                    pass

    # ------------------------------------------------------------ supervision

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    def run(self) -> int:
        self.wakeup.install()
        for sig in (
            signal.SIGHUP,
            signal.SIGTERM,
            signal.SIGQUIT,
            signal.SIGINT,
            signal.SIGTTIN,
            signal.SIGTTOU,
            signal.SIGCHLD,
            signal.SIGUSR1,
        ):
            signal.signal(sig, self._on_signal)
        self.boot()
        import select

        poller = select.poll()
        poller.register(self.wakeup.read_fd, select.POLLIN)
        poller.register(self.channel.fileno(), select.POLLIN)
        last_status = 0.0
        while True:
            poller.poll(500 if self.mode == "serving" else 50)
            self.wakeup.drain()
            now = time.monotonic()
            if not self._read_channel():
                if self.mode == "serving":
                    log.error(
                        "%s: the master is gone; stopping generation %d",
                        self.cfg.name,
                        self.cfg.generation,
                    )
                    self._begin_drain(signal.SIGTERM, now, min(self.cfg.graceful_timeout, 5.0))
            while self.signals:
                self._handle_signal(self.signals.pop(0), now)
            self._reap(now)
            if self.mode != "serving" and not any(s.pid for s in self.slots):
                return 0
            if self.mode == "serving":
                self._respawn(now)
                self._kill_stuck(now)
            elif now <= self.drain_deadline:
                self._drain_tick()
            else:
                log.warning(
                    "%s: generation %d did not drain within %.0f s; killing its workers",
                    self.cfg.name,
                    self.cfg.generation,
                    self.cfg.graceful_timeout,
                )
                self.stop_workers(signal.SIGKILL)
                self.drain_deadline = now + 3600
            if now - last_status >= 1.0:
                last_status = now
                self.report(event="status", workers=self.status())

    def _read_channel(self) -> bool:
        """Apply the master's commands; False when the master is gone (end of file)."""
        try:
            data = self.channel.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        messages, self.channel_buf = control.split_messages(self.channel_buf + data)
        for msg in messages:
            if msg.get("cmd") == "nproc" and self.mode == "serving":
                self._resize(int(msg["n"]))
        return True

    def _resize(self, target: int) -> None:
        live = [s for s in self.slots if not s.retired]
        while len(live) > max(1, target):
            slot = live.pop()
            slot.retired = True
            if slot.pid:
                os.kill(slot.pid, signal.SIGTERM)
        for slot in self.slots:
            if len(live) >= min(target, MAX_WORKERS):
                break
            if slot.retired:
                slot.retired = False
                slot.respawn_at = 0.0
                live.append(slot)
        while len(live) < min(target, MAX_WORKERS):
            slot = _Slot(len(self.slots))
            self.slots.append(slot)
            live.append(slot)
        log.info("%s: %d workers", self.cfg.name, len(live))

    def _drain_tick(self) -> None:
        """Called while draining; Python workers drain themselves."""

    def _begin_drain(self, worker_signal: int, now: float, timeout: float) -> None:
        self.mode = "draining"
        self.drain_deadline = now + timeout
        self.stop_workers(worker_signal)

    def _handle_signal(self, sig: int, now: float) -> None:
        if sig == signal.SIGCHLD:
            return
        if sig in (signal.SIGHUP, signal.SIGTERM):
            if self.mode == "serving":
                self._begin_drain(sig, now, self.cfg.graceful_timeout)
        elif sig in (signal.SIGQUIT, signal.SIGINT):
            self.mode = "stopping"
            self.stop_workers(signal.SIGQUIT)
            self.drain_deadline = now + 2.0
        elif sig == signal.SIGUSR1:
            self.stop_workers(signal.SIGUSR1)

    def _reap(self, now: float) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for slot in self.slots:
                if slot.pid == pid:
                    served = self.board.read(slot.index).requests
                    self.board.reset(slot.index, 0)
                    if self.mode != "serving" or slot.retired:
                        slot.pid = 0
                        break
                    code = os.waitstatus_to_exitcode(status)
                    lived = now - slot.started
                    delay = rules.after_death(slot, rules.Death(code, lived, served), now)
                    if code != 0:
                        how = f"signal {-code}" if code < 0 else f"status {code}"
                        log.error(
                            "%s: worker %d died (%s) after %.1f s and %d requests; respawning%s",
                            self.cfg.name,
                            pid,
                            how,
                            lived,
                            served,
                            f" in {delay:.1f} s" if delay else "",
                        )
                    break

    def _respawn(self, now: float) -> None:
        for slot in rules.due(self.slots, now, self.last_spawn):
            self.spawn(slot)

    def _kill_stuck(self, now: float) -> None:
        """Replace workers that stopped making progress: stuck on one request longer than
        `timeout`, or silent outside a request longer than `heartbeat_timeout` (stopped, or
        hung in native code)."""
        timeout = self.cfg.timeout
        heartbeat = self.cfg.heartbeat_timeout
        if not timeout and not heartbeat:
            return
        wall = time.time()
        for slot in self.slots:
            if not slot.pid:
                continue
            state = self.board.read(slot.index)
            if state.busy:
                if not (timeout and state.started and wall - state.started > timeout):
                    continue
                why = (
                    f"stuck for {wall - state.started:.1f} s on {state.path or '?'} "
                    f"(timeout {timeout:g} s)"
                )
            else:
                if not (heartbeat and state.heartbeat and now - state.heartbeat > heartbeat):
                    continue
                why = (
                    f"made no progress for {now - state.heartbeat:.1f} s outside a request "
                    f"(heartbeat_timeout {heartbeat:g} s)"
                )
            log.error("%s: worker %d %s; killing it", self.cfg.name, slot.pid, why)
            try:
                os.kill(slot.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.board.end(slot.index, state.requests, now)


def _set_parent_death_signal(sig: int) -> None:
    """Linux: deliver `sig` to this process when its parent dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def check_app(spec: str, logs: list[str] | None = None) -> int:
    """`python -m fcgi_engine.serving --check SPEC [--log PATH ...]`: open each log for append
    (as the user the check runs as) and import the app; exit 0, 1, or 5 (not found)."""
    for path in logs or []:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640))
        except OSError as exc:
            print(f"cannot open log {path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    try:
        load_app(spec)
    except AppLoadError as exc:
        print(exc, file=sys.stderr)
        if exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        text = str(exc).lower()
        # 5 (LSB "not installed"): the file or module itself is missing, not something it imports.
        return 5 if text.startswith("no module named") or "does not exist" in text else 1
    return 0


def _drop_privileges(user: str | None, group: str | None) -> None:
    if os.geteuid() != 0 or not (user or group):
        return
    import grp
    import pwd

    pw = pwd.getpwnam(user) if user else None
    gid = grp.getgrnam(group).gr_gid if group else (pw.pw_gid if pw else os.getgid())
    os.setgroups([])
    os.setgid(gid)
    if pw is not None:
        os.initgroups(pw.pw_name, gid)
        os.setuid(pw.pw_uid)
        os.environ["HOME"] = pw.pw_dir


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "--check":
        rest = sys.argv[3:]
        logs = [rest[i + 1] for i in range(len(rest) - 1) if rest[i] == "--log"]
        return check_app(sys.argv[2], logs)
    cfg = GenerationConfig.from_json(os.environ.pop(ENV_KEY))
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [{cfg.name} gen {cfg.generation} %(process)d] %(levelname)s "
        "%(message)s",
        stream=sys.stderr,
    )
    channel = socket.socket(fileno=cfg.channel_fd)
    channel.setblocking(True)
    os.environ["FCGI_ENGINE_GENERATION_ID"] = str(cfg.generation)
    try:
        _drop_privileges(cfg.user, cfg.group)
    except (KeyError, OSError) as exc:
        error = f"cannot switch to user {cfg.user} / group {cfg.group}: {exc}"
        channel.sendall(control.encode({"event": "failed", "error": error}))
        return 1
    if cfg.command:
        from fcgi_engine.serving.command import CommandGeneration

        return CommandGeneration(cfg, channel).run()
    sys.argv = [cfg.app, *cfg.argv]
    try:
        app = load_app(cfg.app)
    except AppLoadError as exc:
        detail = "".join(traceback.format_exception(exc.__cause__)) if exc.__cause__ else ""
        message = f"{exc}\n{detail}".rstrip()
        log.error("cannot load the app: %s", message)
        channel.sendall(control.encode({"event": "failed", "error": message}))
        return 1
    # Once imported, the app's own modules are in memory: the forked workers share them.
    gen = Generation(app, cfg, channel)
    try:
        gen.open_logs()
    except OSError as exc:
        message = f"cannot open access_log {cfg.access_log}: {exc.strerror or exc}"
        log.error("%s", message)
        channel.sendall(control.encode({"event": "failed", "error": message}))
        return 1
    return gen.run()
