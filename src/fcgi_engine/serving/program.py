"""The FastCGI program worker kind (`command:`): php-cgi, a Perl FCGI script, a C responder.

Each of `nproc` processes gets the listening socket as fd 0, the FastCGI way. A foreign program
accepts as soon as it starts, so the release is proven first by one more instance on a private
socket of its own (it must stay up and, with `health`, answer 2xx there); only then are the
workers started on the shared socket. A foreign program cannot be told to stop accepting, so a
drain waits for each process to hold no connection of ours (read from /proc) and only then
sends it SIGTERM: the program is stopped between requests, never in the middle of one. The new
generation already accepts on the same socket, so nothing waiting in the backlog is lost.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence

from fcgi_engine.channel import HealthResult, RequestCounts, WorkerInfo
from fcgi_engine.client import ClientError, request
from fcgi_engine.config.address import TcpAddress, UnixAddress, parse_address
from fcgi_engine.config.boot import BootSpec
from fcgi_engine.serving.kind import BootFailed
from fcgi_engine.serving.slots import Slot


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


# How long a SIGSTOP may take to land (the program is on a CPU, or in a system call).
FREEZE_SECONDS = 0.1


def _process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("" when the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _freeze(pid: int) -> bool:
    """SIGSTOP `pid` and wait until it is stopped; False (and let go) when it is not."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + FREEZE_SECONDS
    while True:
        state = _process_state(pid)
        if state == "T":
            return True
        if state in ("", "Z", "X") or time.monotonic() >= deadline:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            return False
        time.sleep(0.001)


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


class ProgramWorkers:
    proves_each_worker = False
    retire_signal: int = signal.SIGTERM  # what FastCGI programs know; they finish their request

    def __init__(self, spec: BootSpec) -> None:
        self.command = spec.command
        self.label = spec.command[0]
        self.health = spec.server.health
        self.listen_fd = spec.listen_fd
        self.address = parse_address(spec.server.socket) if spec.server.socket else None
        # A program that cannot start dies at once: a boot waits this long to see that.
        self.settle_seconds = min(0.5, spec.server.boot_timeout / 2)
        self.terminated: set[int] = set()
        self.health_result: HealthResult | None = None

    def _connection_inodes(self) -> set[str]:
        if isinstance(self.address, UnixAddress):
            return _accepted_unix_inodes(os.path.abspath(self.address.path))
        if isinstance(self.address, TcpAddress):
            return _accepted_tcp_inodes(self.address.port)
        return set()

    def busy_pids(self, slots: Sequence[Slot]) -> set[int]:
        ours = self._connection_inodes()
        if not ours:
            return set()
        return {s.pid for s in slots if s.pid and _socket_inodes(s.pid) & ours}

    def _exec(self, listen_fd: int) -> int:
        """Fork and exec the program with `listen_fd` as its fd 0; its pid."""
        pid = os.fork()
        if pid == 0:
            try:
                # exec resets caught signals to their default, not ignored ones: the program
                # must not inherit our ignoring of these.
                for sig in (signal.SIGPIPE, signal.SIGTTIN, signal.SIGTTOU):
                    signal.signal(sig, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                os.dup2(listen_fd, 0)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.close(null)
                os.closerange(3, 65536)
                os.execvp(self.command[0], self.command)
            except BaseException as exc:  # noqa: BLE001 - report and leave
                print(f"cannot exec {self.command[0]}: {exc}", file=sys.stderr, flush=True)
            os._exit(127)
        return pid

    # ------------------------------------------------------------ starting and proving

    def prove_release(self, deadline: float) -> None:
        """Run one instance on a private socket, where no live request can reach it, and check
        it there. Raises BootFailed when it does not hold up."""
        directory = tempfile.mkdtemp(prefix="fcgi-engine-proof-")
        path = os.path.join(directory, "proof.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = 0
        try:
            listener.bind(path)
            listener.listen(16)
            pid = self._exec(listener.fileno())
            settle = time.monotonic() + self.settle_seconds
            while time.monotonic() < settle:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    pid = 0
                    code = os.waitstatus_to_exitcode(status)
                    raise BootFailed(f"{self.command[0]} exited with status {code} at start")
                time.sleep(0.02)
            if self.health:
                self.health_result = HealthResult(self.health, None)
                try:
                    response = request(
                        path, self.health, timeout=max(0.1, deadline - time.monotonic())
                    )
                except ClientError as exc:
                    raise BootFailed(f"health check {self.health}: {exc}") from None
                self.health_result = HealthResult(self.health, response.status)
                if not 200 <= response.status < 300:
                    raise BootFailed(
                        f"health check {self.health} answered {response.status} {response.reason}"
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

    def start(self, slot: Slot, *, live: bool, private: socket.socket | None) -> int:
        # Proven before it starts (prove_release): a program is live from its first accept.
        return self._exec(self.listen_fd)

    def prove_worker(self, slot: Slot, private: socket.socket, deadline: float) -> None:
        """The release was proven as a whole."""

    def go_live(self, slots: Sequence[Slot]) -> None:
        """Programs accept as soon as they start."""

    # ------------------------------------------------------------ stopping

    def signal_for(self, signum: int) -> int | None:
        # A foreign program knows TERM and KILL; QUIT may dump core, and USR1 (our log reopen)
        # would kill most of them: their output goes to our stderr, which the master reopens.
        if signum == signal.SIGQUIT:
            return signal.SIGTERM
        if signum == signal.SIGUSR1:
            return None
        return signum

    def begin_drain(
        self, slots: Sequence[Slot], signum: int, *, serve_backlog: bool = False
    ) -> None:
        # A program accepts on its own: it cannot be told to serve the queue dry first.
        self.drain_step(slots)

    def close_listener(self) -> None:
        try:
            os.close(self.listen_fd)
        except OSError:
            pass

    def drain_step(self, slots: Sequence[Slot]) -> None:
        """Stop each program that holds no connection of ours: between requests.

        A program idle a moment ago may accept a connection before our SIGTERM lands, and die
        with it (nginx answers 502). So an idle-looking program is first frozen (SIGSTOP: out
        of accept(), it can take nothing more), looked at again, and only then terminated;
        SIGCONT lets it act on the SIGTERM, or carry on with what it took meanwhile.
        """
        busy = self.busy_pids(slots)
        idle = [
            s.pid for s in slots if s.pid and s.pid not in busy and s.pid not in self.terminated
        ]
        frozen = [pid for pid in idle if _freeze(pid)]
        if not frozen:
            return
        still_idle = set(frozen) - self.busy_pids(slots)
        for pid in frozen:
            try:
                if pid in still_idle:
                    os.kill(pid, signal.SIGTERM)
                    self.terminated.add(pid)
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------ watching

    def exited(self, slot: Slot) -> int:
        self.terminated.discard(slot.pid)
        return 0

    def stuck(self, slots: Sequence[Slot], now: float) -> list[tuple[Slot, str]]:
        """A foreign program reports no progress; `timeout` does not apply to it."""
        return []

    def status(self, slots: Sequence[Slot]) -> list[WorkerInfo]:
        busy = self.busy_pids(slots)
        return [
            WorkerInfo(
                pid=s.pid,
                state="draining"
                if s.retired or s.recycle
                else ("busy" if s.pid in busy else "idle"),
                requests=0,
                started=s.started,
                started_at=s.started_at,
            )
            for s in slots
            if s.pid
        ]

    def counts(self, slots: Sequence[Slot]) -> RequestCounts | None:
        """A FastCGI program's requests are not seen."""
        return None
