"""A generation supervises its workers: slots, reaping, back-off, resizing, the drain deadline,
its signals and the channel to the master. What a worker is comes from its kind
(serving/kind.py), which the generation is composed with.

Over the channel the generation reports `Failed` (with the error text), `Ready` and a `Status`
every STATUS_INTERVAL and once more as it exits (its workers, its cumulative request counts,
those of its workers that are gone included, and its worker restarts by cause); end-of-file on
it means the master is gone, and the generation then stops its workers rather than serve on as
an orphan.

With max_memory, the generation reads each worker's resident size every MEMORY_CHECK_INTERVAL
and recycles one that grew past it with the kind's retire signal: it finishes its requests and
hands its idle connections on, and its slot gets a fresh worker.

Signals from the master: HUP drains with connection hand-off (a rollout), TERM drains and closes
(a stop), QUIT/INT stop at once, USR1 reopens logs; the worker count comes as a `Resize` message,
and a `Stop` message just before the TERM says whether the workers serve the listen queue dry
first (the master made the listener refuse new connections). Once draining, the generation
closes its own copy of the listener: it starts no more workers.

Until every worker has proven itself, no worker takes a live request: the kind lets them go
live only then, and the generation reports ready in the same step.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from dataclasses import replace
from typing import Any

from fcgi_engine import channel
from fcgi_engine.serving import slots as rules
from fcgi_engine.serving.kind import BootFailed, WorkerKind, signal_workers
from fcgi_engine.serving.slots import Drain, DrainStep, Slot, State
from fcgi_engine.system.procmem import resident_bytes
from fcgi_engine.system.wakeup import WakeupPipe

log = logging.getLogger("fcgi_engine.generation")

HANDLED_SIGNALS = (
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGQUIT,
    signal.SIGINT,
    signal.SIGCHLD,
    signal.SIGUSR1,
)
# With the master gone, nobody waits for a long drain: workers get this long at most.
ORPHAN_DRAIN_SECONDS = 5.0
# A fast stop (QUIT, INT): workers are killed if still there after this long.
FAST_STOP_SECONDS = 2.0
# Often enough that the status page and its request rate are fresh.
STATUS_INTERVAL = 0.5
MEMORY_CHECK_INTERVAL = 1.0


class Generation:
    def __init__(
        self,
        name: str,
        number: int,
        nproc: int,
        kind: WorkerKind,
        master: socket.socket,
        *,
        boot_timeout: float,
        graceful_timeout: float,
        max_memory: int = 0,
    ) -> None:
        self.name = name
        self.number = number
        self.nproc = nproc
        self.kind = kind
        self.master = master
        self.boot_timeout = boot_timeout
        self.graceful_timeout = graceful_timeout
        self.max_memory = max_memory
        self.restarts = dict.fromkeys(channel.RESTART_CAUSES, 0)
        self.slots: list[Slot] = []
        self.state = State.SERVING
        self.drain = Drain()
        self.signals: list[int] = []
        self.lines = channel.LineBuffer()
        self.wakeup = WakeupPipe()
        # Workers started before the whole generation proved itself wait to go live; those
        # started after (replacements, a resize) start live.
        self.proven = False
        self.last_spawn = 0.0
        # Set by the master's Stop message: the TERM that follows serves the queue dry.
        self.serve_backlog = False

    def close_inherited(self) -> None:
        """In a forked worker: close what only the generation may use."""
        self.master.close()
        self.wakeup.close()

    # ------------------------------------------------------------ the master

    def report(self, message: channel.Message) -> None:
        try:
            self.master.sendall(channel.encode(message))
        except OSError:
            pass

    def _read_master(self) -> bool:
        """Apply the master's messages; False when the master is gone (end of file)."""
        try:
            data = self.master.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        for line in self.lines.feed(data):
            try:
                message = channel.decode(line)
            except channel.MessageError as exc:
                log.error("%s: ignored a message from the master: %s", self.name, exc)
                continue
            if isinstance(message, channel.Resize):
                if self.state is State.SERVING:
                    self._resize(message.nproc)
            elif isinstance(message, channel.Stop):
                self.serve_backlog = message.serve_backlog
            else:
                log.error("%s: ignored a %s message from the master", self.name, message)
        return True

    # ------------------------------------------------------------ workers

    def _start(self, slot: Slot, private: socket.socket | None = None) -> None:
        now = time.monotonic()
        self.last_spawn = now
        slot.pid = self.kind.start(slot, live=self.proven, private=private)
        slot.started = now
        slot.started_at = time.time()
        slot.recycle = ""

    def _signal_workers(self, signum: int) -> None:
        sig = self.kind.signal_for(signum)
        if sig is not None:
            signal_workers(self.slots, sig)

    def boot(self) -> None:
        """Prove the release, start the workers, prove each where the kind does; report ready.
        Raises BootFailed (the workers started are killed)."""
        deadline = time.monotonic() + self.boot_timeout
        try:
            self.kind.prove_release(deadline)
            self.proven = not self.kind.proves_each_worker
            privates: list[socket.socket] = []
            try:
                for index in range(self.nproc):
                    slot = Slot(index)
                    self.slots.append(slot)
                    if self.kind.proves_each_worker:
                        ours, theirs = socket.socketpair()
                        privates.append(ours)
                        try:
                            self._start(slot, theirs)
                        finally:
                            theirs.close()
                    else:
                        self._start(slot)
                for slot, private in zip(self.slots, privates, strict=False):
                    self.kind.prove_worker(slot, private, deadline)
            finally:
                for private in privates:
                    private.close()
            self._settle()
        except BootFailed:
            self._signal_workers(signal.SIGKILL)
            raise
        # Proven, all of them: only now may any of them take a live request.
        self.proven = True
        self.kind.go_live(self.slots)
        self.report(
            channel.Ready(
                pids=[s.pid for s in self.slots],
                workers=self.kind.status(self.slots),
                health=self.kind.health_result,
            )
        )

    def _settle(self) -> None:
        """A worker that dies right after its start fails the boot."""
        settle = time.monotonic() + self.kind.settle_seconds
        while time.monotonic() < settle:
            for slot in self.slots:
                pid, status = os.waitpid(slot.pid, os.WNOHANG)
                if pid:
                    slot.pid = 0
                    code = os.waitstatus_to_exitcode(status)
                    raise BootFailed(f"{self.kind.label} exited with status {code} at start")
            time.sleep(0.02)

    # ------------------------------------------------------------ supervision

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)

    def install_signals(self) -> None:
        self.wakeup.install()
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)
        # A resize comes over the channel; these may still arrive from a person.
        signal.signal(signal.SIGTTIN, signal.SIG_IGN)
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)

    def run(self) -> int:
        self.install_signals()
        try:
            self.boot()
        except BootFailed as exc:
            self.report(channel.Failed(error=str(exc), health=self.kind.health_result))
            return 1
        poller = select.poll()
        poller.register(self.wakeup.read_fd, select.POLLIN)
        poller.register(self.master.fileno(), select.POLLIN)
        last_status = last_memory_check = 0.0
        while True:
            poller.poll(250 if self.state is State.SERVING else 50)
            self.wakeup.drain()
            now = time.monotonic()
            if not self._read_master() and self.state is State.SERVING:
                log.error("%s: the master is gone; stopping generation %d", self.name, self.number)
                self._begin_drain(
                    signal.SIGTERM, now, min(self.graceful_timeout, ORPHAN_DRAIN_SECONDS)
                )
            while self.signals:
                self._handle_signal(self.signals.pop(0), now)
            self._reap(now)
            if self.state is State.SERVING:
                self._respawn(now)
                self._kill_stuck(now)
                if self.max_memory and now - last_memory_check >= MEMORY_CHECK_INTERVAL:
                    last_memory_check = now
                    self._recycle_large()
            else:
                step = rules.drain_step(self.drain, now, sum(1 for s in self.slots if s.pid))
                if step is DrainStep.DONE:
                    # The last counts, so the master's totals keep what this generation served.
                    self._report_status()
                    return 0
                if step is DrainStep.KILL:
                    log.warning(
                        "%s: generation %d did not drain within %.0f s; killing its workers",
                        self.name,
                        self.number,
                        self.graceful_timeout,
                    )
                    self._signal_workers(signal.SIGKILL)
                elif self.state is State.DRAINING:
                    self.kind.drain_step(self.slots)
            if now - last_status >= STATUS_INTERVAL:
                last_status = now
                self._report_status()

    def _report_status(self) -> None:
        workers = self.kind.status(self.slots)
        if self.state is not State.SERVING:
            workers = [replace(w, state="draining") for w in workers]
        self.report(
            channel.Status(
                workers=workers, counts=self.kind.counts(self.slots), restarts=dict(self.restarts)
            )
        )

    def _recycle_large(self) -> None:
        """Retire each worker whose resident memory grew past max_memory (once: it drains)."""
        for slot in self.slots:
            if not slot.pid or slot.retired or slot.recycle:
                continue
            rss = resident_bytes(slot.pid)
            if rules.over_memory(rss, self.max_memory):
                slot.recycle = "memory"
                log.warning(
                    "%s: worker %d uses %d MiB, over max_memory (%d MiB); recycling it",
                    self.name,
                    slot.pid,
                    (rss or 0) >> 20,
                    self.max_memory >> 20,
                )
                signal_workers([slot], self.kind.retire_signal)

    def _resize(self, target: int) -> None:
        signal_workers(rules.resize(self.slots, target), self.kind.retire_signal)
        live = sum(1 for s in self.slots if not s.retired)
        log.info("%s: %d workers", self.name, live)

    def _begin_drain(self, signum: int, now: float, timeout: float) -> None:
        self.state = State.DRAINING
        self.drain = Drain(deadline=now + timeout)
        self.kind.begin_drain(
            self.slots, signum, serve_backlog=self.serve_backlog and signum == signal.SIGTERM
        )
        self.kind.close_listener()

    def _handle_signal(self, sig: int, now: float) -> None:
        if sig in (signal.SIGHUP, signal.SIGTERM):
            if self.state is State.SERVING:
                self._begin_drain(sig, now, self.graceful_timeout)
        elif sig in (signal.SIGQUIT, signal.SIGINT):
            self.state = State.STOPPING
            self.drain = Drain(deadline=now + FAST_STOP_SECONDS)
            self._signal_workers(signal.SIGQUIT)
        elif sig == signal.SIGUSR1:
            self._signal_workers(signal.SIGUSR1)

    def _reap(self, now: float) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            served = self.kind.exited(slot)
            if self.state is not State.SERVING or slot.retired:
                slot.pid = 0
                continue
            code = os.waitstatus_to_exitcode(status)
            cause = rules.restart_cause(slot, code)
            self.restarts[cause] = self.restarts.get(cause, 0) + 1
            lived = now - slot.started
            delay = rules.after_death(slot, rules.Death(code, lived, served), now)
            if code != 0:
                how = f"signal {-code}" if code < 0 else f"status {code}"
                log.error(
                    "%s: worker %d died (%s) after %.1f s and %d requests; respawning%s",
                    self.name,
                    pid,
                    how,
                    lived,
                    served,
                    f" in {delay:.1f} s" if delay else "",
                )

    def _respawn(self, now: float) -> None:
        for slot in rules.due(self.slots, now, self.last_spawn):
            self._start(slot)

    def _kill_stuck(self, now: float) -> None:
        for slot, why in self.kind.stuck(self.slots, now):
            log.error("%s: worker %d %s; killing it", self.name, slot.pid, why)
            slot.recycle = "timeout"
            signal_workers([slot], signal.SIGKILL)
