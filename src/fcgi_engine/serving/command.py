"""A generation of any FastCGI program (`command:`): php-cgi, a Perl FCGI script, a C responder.

Each of `nproc` processes gets the listening socket as fd 0, the FastCGI way. A foreign program
accepts as soon as it starts, so the release is proven first by one more instance on a private
socket of its own (it must stay up and, with `health`, answer 2xx there); only then are the
workers started on the shared socket. A foreign program cannot be told to stop accepting, so a
drain waits for each process to hold no connection of
ours (read from /proc) and only then sends it SIGTERM: the program is stopped between requests,
never in the middle of one. The new generation already accepts on the same socket, so nothing
waiting in the backlog is lost.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import NoReturn

from fcgi_engine.config.address import TcpAddress, UnixAddress, parse_address
from fcgi_engine.config.generation import GenerationConfig
from fcgi_engine.serving.generation import Generation, _Slot

log = logging.getLogger("fcgi_engine.generation")


def _accepted_unix_inodes(path: str) -> set[str]:
    inodes = set()
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                # Num RefCount Protocol Flags Type St Inode Path; St 03 = connected.
                if len(parts) >= 8 and parts[7] == path and parts[5] == "03":
                    inodes.add(parts[6])
    except OSError:
        pass
    return inodes


def _accepted_tcp_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if int(local.rsplit(":", 1)[1], 16) == port and state != "0A":
                        inodes.add(inode)
        except OSError:
            continue
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


class CommandGeneration(Generation):
    def __init__(self, cfg: GenerationConfig, channel: socket.socket) -> None:
        super().__init__(None, cfg, channel)  # type: ignore[arg-type]
        self.address = parse_address(cfg.address) if cfg.address else None
        self.terminated: set[int] = set()

    def _connection_inodes(self) -> set[str]:
        if isinstance(self.address, UnixAddress):
            return _accepted_unix_inodes(os.path.abspath(self.address.path))
        if isinstance(self.address, TcpAddress):
            return _accepted_tcp_inodes(self.address.port)
        return set()

    def busy_pids(self) -> set[int]:
        ours = self._connection_inodes()
        if not ours:
            return set()
        return {s.pid for s in self.slots if s.pid and _socket_inodes(s.pid) & ours}

    def status(self) -> list[dict[str, object]]:
        busy = self.busy_pids()
        return [
            {
                "pid": s.pid,
                "state": "busy" if s.pid in busy else "idle",
                "requests": 0,
                "started": s.started,
            }
            for s in self.slots
            if s.pid
        ]

    def _start(self, listen_fd: int) -> int:
        """Fork and exec the program with `listen_fd` as its fd 0; its pid."""
        pid = os.fork()
        if pid == 0:
            try:
                for sig in (
                    signal.SIGHUP,
                    signal.SIGTERM,
                    signal.SIGQUIT,
                    signal.SIGINT,
                    signal.SIGCHLD,
                    signal.SIGUSR1,
                    signal.SIGUSR2,
                    signal.SIGPIPE,
                ):
                    signal.signal(sig, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                os.dup2(listen_fd, 0)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.close(null)
                os.closerange(3, 65536)
                os.execvp(self.cfg.command[0], self.cfg.command)
            except BaseException as exc:  # noqa: BLE001 - report and leave
                print(f"cannot exec {self.cfg.command[0]}: {exc}", file=sys.stderr, flush=True)
            os._exit(127)
        return pid

    def spawn(self, slot: _Slot, private: socket.socket | None = None) -> None:
        slot.pid = self._start(self.listener.fileno())
        slot.started = self.last_spawn = time.monotonic()

    def _fail(self, error: str) -> NoReturn:
        self.report(event="failed", error=error)
        self.stop_workers(signal.SIGKILL)
        raise SystemExit(1)

    def _prove(self, deadline: float) -> None:
        """Run one instance on a private socket, where no live request can reach it, and check
        it there; report the failure and exit when it does not hold up."""
        directory = tempfile.mkdtemp(prefix="fcgi-engine-proof-")
        path = os.path.join(directory, "proof.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = 0
        try:
            listener.bind(path)
            listener.listen(16)
            pid = self._start(listener.fileno())
            # A program that cannot start dies at once: give it a moment to show that.
            settle = time.monotonic() + min(0.5, self.cfg.boot_timeout / 2)
            while time.monotonic() < settle:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    pid = 0
                    code = os.waitstatus_to_exitcode(status)
                    self._fail(f"{self.cfg.command[0]} exited with status {code} at start")
                time.sleep(0.02)
            if self.cfg.health:
                from fcgi_engine.client import ClientError, request

                try:
                    response = request(
                        path, self.cfg.health, timeout=max(0.1, deadline - time.monotonic())
                    )
                except ClientError as exc:
                    self._fail(f"health check {self.cfg.health}: {exc}")
                if not 200 <= response.status < 300:
                    self._fail(
                        f"health check {self.cfg.health} answered "
                        f"{response.status} {response.reason}"
                    )
        finally:
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
            listener.close()
            shutil.rmtree(directory, ignore_errors=True)

    def boot(self) -> None:
        deadline = time.monotonic() + self.cfg.boot_timeout
        self._prove(deadline)
        self.proven = True
        for index in range(self.cfg.nproc):
            slot = _Slot(index)
            self.slots.append(slot)
            self.spawn(slot)
        # The same program just proved itself; one that dies at once now still fails the boot.
        settle = time.monotonic() + min(0.5, self.cfg.boot_timeout / 2)
        while time.monotonic() < settle:
            for slot in self.slots:
                pid, status = os.waitpid(slot.pid, os.WNOHANG)
                if pid:
                    slot.pid = 0
                    code = os.waitstatus_to_exitcode(status)
                    self._fail(f"{self.cfg.command[0]} exited with status {code} at start")
            time.sleep(0.02)
        self.report(event="ready", pids=[s.pid for s in self.slots], workers=self.status())

    def stop_workers(self, sig: int) -> None:
        # A foreign program knows TERM and KILL; QUIT may dump core.
        super().stop_workers(signal.SIGTERM if sig == signal.SIGQUIT else sig)

    def _begin_drain(self, worker_signal: int, now: float, timeout: float) -> None:
        self.mode = "draining"
        self.drain_deadline = now + timeout
        self._drain_tick()

    def _drain_tick(self) -> None:
        busy = self.busy_pids()
        for slot in self.slots:
            if slot.pid and slot.pid not in busy and slot.pid not in self.terminated:
                self.terminated.add(slot.pid)
                try:
                    os.kill(slot.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
