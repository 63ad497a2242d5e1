"""The Python worker kind: WSGI workers forked from the generation that imported the app once.

Each worker is proven over a private connection (the `health` path, else GET_VALUES) before any
of them takes a live request; then each is told to go live (SIGUSR2). A shared-memory
scoreboard tells the generation which worker is busy, on what, since when, whether it still
makes progress (its heartbeat), and what it served (requests by status class and duration); the
counts of workers that are gone are kept here, so the generation's totals never go backwards.

A stop that serves the listen queue dry (begin_drain with serve_backlog) is told to the workers
through one shared byte (`backlog_flag`), set before their SIGTERM: a signal carries no value.
"""

from __future__ import annotations

import logging
import mmap
import os
import random
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from fcgi_engine.channel import CurrentRequest, HealthResult, RequestCounts, WorkerInfo
from fcgi_engine.client import ClientError, get_values, request
from fcgi_engine.config.boot import BootSpec
from fcgi_engine.serving.kind import BootFailed, signal_workers
from fcgi_engine.serving.loader import WSGIApp
from fcgi_engine.serving.scoreboard import N_BUCKETS, STATUS_CLASSES, Scoreboard, WorkerState
from fcgi_engine.serving.slots import MAX_WORKERS, Slot
from fcgi_engine.serving.worker import Worker
from fcgi_engine.serving.worker_base import WorkerOptions
from fcgi_engine.system.logfile import open_log

if TYPE_CHECKING:
    from fcgi_engine.serving.asgi import AsgiWorker

log = logging.getLogger("fcgi_engine.generation")


def open_access_log(path: str | None) -> int:
    """The access log's fd (-1 without one), opened here, as the app's user, so that a failure
    is the rollout's error rather than every worker's."""
    if not path:
        return -1
    return open_log(path)


class PythonWorkers:
    label = "worker"
    proves_each_worker = True
    retire_signal: int = signal.SIGHUP
    settle_seconds = 0.0

    def __init__(
        self,
        app: WSGIApp,
        spec: BootSpec,
        *,
        interface: str = "wsgi",
        access_fd: int = -1,
        after_fork: Callable[[], None] = lambda: None,
    ) -> None:
        self.app = app
        self.spec = spec
        self.interface = interface  # "wsgi" or "asgi", resolved when the app was loaded
        self.server = spec.server
        self.access_fd = access_fd
        # Closes, in a new worker, what only the generation may use (its channel, its wake-up).
        self.after_fork = after_fork
        self.listener = socket.socket(fileno=spec.listen_fd)
        self.handoff_send = (
            socket.socket(fileno=spec.handoff_send_fd) if spec.handoff_send_fd >= 0 else None
        )
        self.handoff_recv = (
            socket.socket(fileno=spec.handoff_recv_fd) if spec.handoff_recv_fd >= 0 else None
        )
        # Where a worker passes a request for status_path to the master (fcgi_engine.status_pass).
        self.status_pass = (
            socket.socket(fileno=spec.status_pass_fd) if spec.status_pass_fd >= 0 else None
        )
        self.board = Scoreboard(MAX_WORKERS)
        # 1 once a stop asks the workers to serve the listen queue dry (shared with them).
        self.backlog_flag = mmap.mmap(-1, 1)
        self.health_result: HealthResult | None = None
        # The counts of the workers that are gone (their slots are reset for the next one).
        self.gone = RequestCounts.zero(len(STATUS_CLASSES), N_BUCKETS)

    # ------------------------------------------------------------ starting and proving

    def prove_release(self, deadline: float) -> None:
        """Each worker is proven on its own."""

    def start(self, slot: Slot, *, live: bool, private: socket.socket | None) -> int:
        self.board.reset(slot.index, 0, time.monotonic())
        jitter = self.server.max_requests_jitter
        options = WorkerOptions.derive(
            self.server,
            allowed_addrs=self.spec.allowed_addrs,
            nproc=self.spec.nproc,
            jitter=random.randint(0, jitter) if jitter else 0,
        )
        pid = os.fork()
        if pid == 0:
            self._become_worker(slot, options, live, private)
        self.board.set_pid(slot.index, pid)
        return pid

    def _become_worker(
        self, slot: Slot, options: WorkerOptions, live: bool, private: socket.socket | None
    ) -> None:
        code = 0
        try:
            # A generation that dies (killed from outside) leaves its workers to drain with
            # hand-off, as in a rollout: the master boots the next one at once.
            _set_parent_death_signal(signal.SIGHUP)
            self.after_fork()
            worker_class: type[Worker] | type[AsgiWorker] = Worker
            if self.interface == "asgi":
                # Imported here: asyncio costs a WSGI worker nothing it does not use.
                from fcgi_engine.serving.asgi import AsgiWorker

                worker_class = AsgiWorker
            worker = worker_class(
                self.app,
                self.listener,
                options,
                handoff_send=self.handoff_send,
                handoff_recv=self.handoff_recv,
                private=private,
                scoreboard=self.board,
                slot=slot.index,
                live=live,
                access_fd=self.access_fd,
                status_pass=self.status_pass,
                backlog_flag=self.backlog_flag,
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

    def prove_worker(self, slot: Slot, private: socket.socket, deadline: float) -> None:
        private.settimeout(max(0.1, deadline - time.monotonic()))
        health = self.server.health
        try:
            if health:
                self.health_result = HealthResult(health, None)
                response = request(private, health, keep_conn=True)
                self.health_result = HealthResult(health, response.status)
                if not 200 <= response.status < 300:
                    body = response.body[:2000].decode("utf-8", "replace")
                    raise BootFailed(
                        f"worker {slot.pid}: health check {health} answered "
                        f"{response.status} {response.reason}: {body}"
                    )
            else:
                get_values(private, ["FCGI_MPXS_CONNS"])
        except (ClientError, OSError) as exc:
            raise BootFailed(f"worker {slot.pid}: {exc}") from None

    def go_live(self, slots: Sequence[Slot]) -> None:
        signal_workers(slots, signal.SIGUSR2)

    # ------------------------------------------------------------ stopping

    def signal_for(self, signum: int) -> int | None:
        return signum

    def begin_drain(
        self, slots: Sequence[Slot], signum: int, *, serve_backlog: bool = False
    ) -> None:
        # The workers drain themselves: HUP hands idle connections on, TERM closes them.
        self.backlog_flag[0] = 1 if serve_backlog else 0
        signal_workers(slots, signum)

    def close_listener(self) -> None:
        self.listener.close()

    def drain_step(self, slots: Sequence[Slot]) -> None:
        """The workers drain themselves."""

    # ------------------------------------------------------------ watching

    def exited(self, slot: Slot) -> int:
        state = self.board.read(slot.index)
        self.gone = self.gone.plus(_counts_of(state))
        self.board.reset(slot.index, 0)
        return state.requests

    def counts(self, slots: Sequence[Slot]) -> RequestCounts:
        total = self.gone
        for slot in slots:
            if slot.pid:
                total = total.plus(_counts_of(self.board.read(slot.index)))
        return total

    def stuck(self, slots: Sequence[Slot], now: float) -> list[tuple[Slot, str]]:
        """Stuck on one request longer than `timeout`, or silent outside a request longer than
        `heartbeat_timeout` (stopped, or hung in native code)."""
        timeout = self.server.timeout
        heartbeat = self.server.heartbeat_timeout
        if not timeout and not heartbeat:
            return []
        wall = time.time()
        found = []
        for slot in slots:
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
            # Counted as ended now, so it is not reported again before it is reaped.
            self.board.end(slot.index, state.requests, now)
            found.append((slot, why))
        return found

    def status(self, slots: Sequence[Slot]) -> list[WorkerInfo]:
        workers = []
        for slot in slots:
            if slot.pid:
                state = self.board.read(slot.index)
                busy = state.busy and state.started > 0
                workers.append(
                    WorkerInfo(
                        pid=slot.pid,
                        state="draining"
                        if slot.retired or slot.recycle
                        else ("busy" if busy else "idle"),
                        requests=state.requests,
                        started=slot.started,
                        started_at=slot.started_at,
                        request=(
                            CurrentRequest(state.method, state.path, state.started)
                            if busy
                            else None
                        ),
                        in_flight=max(1, state.in_flight) if busy else 0,
                    )
                )
        return workers


def _counts_of(state: WorkerState) -> RequestCounts:
    return RequestCounts(state.by_class, state.buckets, state.duration_sum)


def _set_parent_death_signal(sig: int) -> None:
    """Linux: deliver `sig` to this process when its parent dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
