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

A booting generation can run at a lower CPU priority (BootPriority; $FCGI_ENGINE_BOOT_NICE, off
by default: see BOOT_NICE) until it is proven, so that its interpreter start and app import
take less of the cores the serving generation uses during a rollout. The lever is the Linux
autogroup: the master starts every generation in a session of its own, and with
sched_autogroup_enabled the scheduler shares the CPU between sessions first; a process's own
nice value only counts inside its session, where the importing generation is alone. The
autogroup's nice is raised for the boot and set back to 0 once the generation is proven (its
workers, in the same session, then serve at normal weight). Raising it and setting it back to
0 needs no privilege (only a negative value does), so a master that is not root works the
same; it is written through a descriptor opened before any user switch, because after setuid
the process is no longer dumpable and /proc/self/autogroup belongs to root. Where autogroups
do not apply (disabled, or the master runs in a cpu cgroup of its own, as a systemd service
with the cpu controller does), the write changes nothing and the boot competes as before. An
import that takes more than half of boot_timeout goes back to normal priority, so a saturated
machine still boots it.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import threading
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
# The autogroup nice of a booting generation, by default none: on a saturated machine a lower
# weight only stretches the import's CPU over more time (nice 10: a 1 s CPU import served after
# 13-16 s instead of 4 s) and the worst 1-s window of bench/rollout.py did not improve at nice
# 5 or 10 (its dip follows the switch-over, not the import): bench/RESULTS.md, issue 11 item 5.
BOOT_NICE = 0
# Overrides BOOT_NICE (0-19): e.g. 5 gives a booting generation about a third of a serving
# session's CPU weight while the machine is busy, and costs nothing while it is idle.
BOOT_NICE_ENV = "FCGI_ENGINE_BOOT_NICE"
AUTOGROUP = "/proc/self/autogroup"


class BootPriority:
    """The booting generation's lower CPU priority (its session's autogroup nice): lowered
    from the start, restored once it is proven (or once its import outlasts a deadline)."""

    def __init__(self, nice: int) -> None:
        self.nice = nice
        self.fd = -1
        self.lowered = False
        self.timer: threading.Timer | None = None

    @classmethod
    def lower(cls, nice: int | None = None) -> BootPriority:
        """Lower this session's priority now (before any user switch: see the module doc)."""
        if nice is None:
            try:
                nice = int(os.environ.get(BOOT_NICE_ENV, BOOT_NICE))
            except ValueError:
                nice = BOOT_NICE
        priority = cls(max(0, min(nice, 19)))
        if priority.nice:
            try:
                priority.fd = os.open(AUTOGROUP, os.O_WRONLY | os.O_CLOEXEC)
                os.write(priority.fd, str(priority.nice).encode())
                priority.lowered = True
            except OSError as exc:
                # No autogroups in this kernel, or not ours to write: boot at normal priority.
                log.debug("boot priority unchanged: %s", exc)
                priority.close()
        return priority

    def restore_after(self, seconds: float) -> None:
        """Restore at the latest `seconds` from now, even while the import runs."""
        if self.lowered:
            self.timer = threading.Timer(seconds, self.restore)
            self.timer.daemon = True
            self.timer.start()

    def stop_timer(self) -> None:
        """Before forking workers: no thread may be running across a fork."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer.join()
            self.timer = None

    def restore(self) -> bool:
        """Back to normal priority; False when the kernel asks to retry (EAGAIN: without
        CAP_SYS_ADMIN, one autogroup change per 0.1 s, machine-wide): call again later."""
        if not self.lowered:
            return True
        try:
            os.write(self.fd, b"0")
        except OSError as exc:
            if exc.errno == errno.EAGAIN:
                return False
            log.debug("boot priority not restored: %s", exc)
        self.lowered = False
        self.close()
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
        priority: BootPriority | None = None,
    ) -> None:
        self.name = name
        self.number = number
        self.nproc = nproc
        self.kind = kind
        self.master = master
        self.boot_timeout = boot_timeout
        self.graceful_timeout = graceful_timeout
        self.max_memory = max_memory
        self.priority = priority or BootPriority(0)
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
        self.priority.close()

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
        self.priority.stop_timer()
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
        # Proven, all of them: only now may any of them take a live request, at full weight.
        self.proven = True
        self.priority.restore()
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
            # A restore the kernel deferred (EAGAIN) is retried soon: the workers serve meanwhile.
            poller.poll(20 if self.priority.lowered else 250 if self.state is State.SERVING else 50)
            self.wakeup.drain()
            now = time.monotonic()
            if self.priority.lowered:
                self.priority.restore()
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
