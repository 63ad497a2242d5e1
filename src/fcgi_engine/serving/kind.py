"""What a generation needs of a worker kind: the seam between supervising workers and being one.

A generation (serving/generation.py) owns its slots, reaping, back-off, resizing, the drain
deadline, its signals and the channel to the master. How a worker is started, proven, stopped,
drained and read for status is the kind's: Python WSGI workers forked from the imported app
(serving/prefork.py) and any FastCGI program exec'd with the socket as fd 0 (serving/program.py)
are two kinds; the generation is composed with one of them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Protocol

from fcgi_engine.channel import HealthResult, RequestCounts, WorkerInfo
from fcgi_engine.serving.slots import Slot


def signal_workers(slots: Sequence[Slot], signum: int) -> None:
    """Send `signum` to the worker of each slot that has one (a worker gone already is fine)."""
    for slot in slots:
        if slot.pid:
            try:
                os.kill(slot.pid, signum)
            except ProcessLookupError:
                pass


class BootFailed(Exception):
    """The new generation cannot serve; the message is what the operator is shown."""


class WorkerKind(Protocol):
    # What a worker is called in messages ("worker", or the program's name).
    label: str
    # Each worker gets a private connection at boot and must answer on it (`prove_worker`)
    # before any of them goes live; otherwise the kind proves the release in `prove_release`.
    proves_each_worker: bool
    # Sent to a worker a resize retires (TTOU): it finishes what it holds and, where it can,
    # hands its idle keep-alive connections to its siblings rather than close them on nginx.
    retire_signal: int
    # After the workers start, a boot waits this long for one to die at once (a program that
    # cannot start), which fails the boot.
    settle_seconds: float
    # The health check the boot made (path and status), for the master's rollout outcome;
    # None when no health path is configured (or none was asked yet).
    health_result: HealthResult | None

    def prove_release(self, deadline: float) -> None:
        """Before any worker starts: prove the release where no live request reaches it.
        Raises BootFailed."""

    def start(self, slot: Slot, *, live: bool, private: socket.socket | None) -> int:
        """Start the worker of `slot`; its pid. `live`: it may take live requests at once."""

    def prove_worker(self, slot: Slot, private: socket.socket, deadline: float) -> None:
        """The worker of `slot` answers on its private connection. Raises BootFailed."""

    def go_live(self, slots: Sequence[Slot]) -> None:
        """Every worker was proven: let them take live requests."""

    def signal_for(self, signum: int) -> int | None:
        """The signal to send this kind's workers for the generation's `signum`, or None when
        the kind has no use for it."""

    def begin_drain(
        self, slots: Sequence[Slot], signum: int, *, serve_backlog: bool = False
    ) -> None:
        """Start draining (SIGHUP: hand idle connections on; SIGTERM: close them). With
        `serve_backlog` (a stop whose listener refuses new connections), the workers accept
        until the listen queue stays empty, then close their copies of the listener."""

    def close_listener(self) -> None:
        """Close the generation's own copy of the listening socket: it starts no more workers
        (draining), and every copy must close for late connects to be refused."""

    def drain_step(self, slots: Sequence[Slot]) -> None:
        """Called while draining, about 20 times a second."""

    def exited(self, slot: Slot) -> int:
        """The worker of `slot` was reaped: the requests it served (0 when not known)."""

    def stuck(self, slots: Sequence[Slot], now: float) -> list[tuple[Slot, str]]:
        """Workers that stopped making progress, each with why; the generation kills them."""

    def status(self, slots: Sequence[Slot]) -> list[WorkerInfo]:
        """Each running worker, for the master's status."""

    def counts(self, slots: Sequence[Slot]) -> RequestCounts | None:
        """The requests every worker of the generation served, those gone included; None when
        the kind does not count them."""
