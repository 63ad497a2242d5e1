"""The sd_notify protocol, client side: tell the service manager (systemd) how the master is doing.

Contract:
- `$NOTIFY_SOCKET` names an AF_UNIX datagram socket: a path, or an abstract name spelled with a
  leading "@". Without it every call is a no-op, so the master runs the same under systemd or not.
- One notification is one datagram of newline-separated KEY=VALUE lines ("READY=1\\nSTATUS=...").
- Sending never blocks and never raises: a service manager that is gone, slow or misconfigured
  must not stop the master from serving. The first failure is logged (once); later ones are not.
- `$WATCHDOG_USEC` (with `$WATCHDOG_PID` unset or naming this process) asks for WATCHDOG=1 at
  least that often; `watchdog_interval` is half of it, as sd_watchdog_enabled(3) advises.
- The variables are for this process only: `child_environment` drops them, so app code in the
  generations can never notify on the master's behalf. The master keeps them across its own
  re-exec (same pid), where they still apply.

`ServiceReporter` maps the master's state onto the protocol. It is fed a `ServiceState` after every
decision and sends only what changed: READY=1 (with MAINPID) once the first generation has proven
itself (or once a re-exec'd image holds the serving generation again); RELOADING=1 with
MONOTONIC_USEC when a rollout starts while a generation serves, and READY=1 when it ends, with a
STATUS= saying "rolled out to generation N" or "rolled back: <error>"; STOPPING=1 once; STATUS=
lines (generation, workers, requests) when they change, at most every STATUS_INTERVAL seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

log = logging.getLogger("fcgi_engine.master")

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
# What belongs to the master alone and must not reach a process it starts.
PRIVATE_VARIABLES = (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID)

# A STATUS= line is for humans (`systemctl status`); systemd keeps it whole, but a line longer than
# a terminal says nothing more.
MAX_STATUS = 200
# Periodic STATUS= lines: under load the request count changes all the time; one line every few
# seconds is what a human reading `systemctl status` can use, and costs the master nothing.
STATUS_INTERVAL = 2.0


def child_environment(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """`env` without the service manager's variables (changed in place, and returned)."""
    for key in PRIVATE_VARIABLES:
        env.pop(key, None)
    return env


def socket_address(value: str) -> str | bytes | None:
    """The address to send to for a $NOTIFY_SOCKET value, or None when it names none we can use.

    "@name" is Linux's abstract namespace (a leading NUL byte on the wire); anything else must be
    an absolute path. systemd itself never sets a relative path; refusing one avoids sending our
    state to a file that happens to sit in the current directory.
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def one_line(text: str) -> str:
    """`text` fit for a KEY=VALUE line: its first non-empty line, shortened to MAX_STATUS."""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first if len(first) <= MAX_STATUS else first[: MAX_STATUS - 3] + "..."


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as systemd wants it in MONOTONIC_USEC= (it compares the
    value with its own clock to tell which reload a READY=1 ends)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """A connectionless sender to the service manager; inert when there is none."""

    def __init__(self, address: str | bytes | None, watchdog_interval: float | None = None) -> None:
        self.address = address
        self.watchdog_interval = watchdog_interval
        self._sock: socket.socket | None = None
        self._complained = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier $NOTIFY_SOCKET and $WATCHDOG_USEC ask for (the variables stay set)."""
        env = os.environ if environ is None else environ
        raw = env.get(NOTIFY_SOCKET, "")
        address = socket_address(raw) if raw else None
        if raw and address is None:
            log.warning("%s=%r: not an absolute path nor @abstract; ignored", NOTIFY_SOCKET, raw)
        return cls(address, _watchdog_interval(env) if address is not None else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send KEY=VALUE `lines` as one datagram; True if it went out. Never blocks or raises."""
        if self.address is None or not lines:
            return False
        data = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(data, self.address)
        except OSError as exc:
            # EAGAIN (the manager's queue is full), ECONNREFUSED/ENOENT (it is gone), EMFILE...:
            # the notification is lost, the master goes on. Said once: a manager that is gone
            # stays gone, and the log must not fill with it.
            if not self._complained:
                self._complained = True
                log.warning(
                    "cannot notify the service manager at %s: %s (further failures not logged)",
                    self.address_text,
                    exc,
                )
            return False
        return True

    @property
    def address_text(self) -> str:
        if isinstance(self.address, bytes):
            return "@" + self.address[1:].decode("utf-8", "replace")
        return str(self.address)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the manager's timeout), or None: no watchdog."""
    try:
        usec = int(env.get(WATCHDOG_USEC, ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get(WATCHDOG_PID, "")
    if owner:
        try:
            if int(owner) != os.getpid():
                return None  # meant for another process (the one that exec'd us, or a parent)
        except ValueError:
            return None
    return usec / 2 / 1_000_000


@dataclass(frozen=True)
class RolloutOutcome:
    """How the last boot of a generation ended (the master's RolloutResponse, reduced)."""

    generation: int
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class ServiceState:
    """What the service manager is told about, read from the master's policy."""

    ready: bool  # the first generation has proven itself (or a re-exec adopted a serving one)
    serving: int | None  # the generation taking requests
    booting: int | None  # the generation proving itself
    stopping: bool
    workers: int = 0
    busy: int = 0
    requests: int = 0
    last_boot: RolloutOutcome | None = None


class ServiceReporter:
    """Turns the master's successive states into notifications, each sent once."""

    def __init__(
        self,
        notifier: Notifier,
        *,
        reexecuted: bool = False,
        status_interval: float = STATUS_INTERVAL,
    ) -> None:
        self.notifier = notifier
        self.reexecuted = reexecuted
        self.status_interval = status_interval
        self.ready_sent = False
        self.stopping_sent = False
        # The generation whose rollout RELOADING=1 announced, until READY=1 ends it.
        self.reloading: int | None = None
        self.last_status = ""
        self.last_status_at = -float("inf")
        self.next_watchdog = 0.0

    @property
    def enabled(self) -> bool:
        return self.notifier.enabled

    def observe(self, state: ServiceState, now: float) -> None:
        """Send what `state` changed since the last call."""
        if not self.notifier.enabled:
            return
        if state.stopping:
            if not self.stopping_sent:
                self.stopping_sent = True
                self.reloading = None  # a boot cut short by the stop is no rollback to report
                failed = state.last_boot if not state.ready else None
                if failed is not None and not failed.ok:
                    text = f"failed to start: {one_line(failed.error)}"
                else:
                    text = "stopping"
                self._send(now, "STOPPING=1", status=text)
            return
        if not self.ready_sent and state.ready and state.serving is not None:
            self.ready_sent = True
            text = self.summary(state)
            if self.reexecuted:
                text = f"master re-executed in place; {text}"
            # MAINPID: after a re-exec the pid is the same, but say so, in case the manager
            # lost track (and for `serve --daemon`, whose master is not the process started).
            self._send(now, "READY=1", f"MAINPID={os.getpid()}", status=text)
        if self.reloading is not None and state.booting != self.reloading:
            self._send(now, "READY=1", status=self._rollout_result(self.reloading, state))
            self.reloading = None
        if (
            self.ready_sent
            and self.reloading is None
            and state.booting is not None
            and state.serving is not None
        ):
            # A boot while a generation serves is a rollout (a respawn of an empty pool is not:
            # nothing serves, there is nothing to reload).
            self.reloading = state.booting
            self._send(
                now,
                "RELOADING=1",
                f"MONOTONIC_USEC={monotonic_usec()}",
                status=f"rolling out generation {state.booting}",
            )
        if self.ready_sent and self.reloading is None:
            text = self.summary(state)
            if text != self.last_status and now - self.last_status_at >= self.status_interval:
                self._send(now, status=text)

    def watchdog(self, now: float) -> None:
        """WATCHDOG=1 when one is due (call it on every turn of the loop)."""
        interval = self.notifier.watchdog_interval
        if interval is None or now < self.next_watchdog:
            return
        self.next_watchdog = now + interval
        self.notifier.notify("WATCHDOG=1")

    def seconds_to_watchdog(self, now: float) -> float | None:
        """How long the loop may sleep before the next WATCHDOG=1 is due (None: no watchdog)."""
        if self.notifier.watchdog_interval is None:
            return None
        return max(0.0, self.next_watchdog - now)

    @staticmethod
    def summary(state: ServiceState) -> str:
        if state.serving is None:
            if state.booting is None:
                return "no generation serves"
            return f"no generation serves; booting generation {state.booting}"
        text = (
            f"generation {state.serving}: {state.workers} workers ({state.busy} busy), "
            f"{state.requests} requests"
        )
        if state.booting is not None:
            text += f"; booting generation {state.booting}"
        return text

    @staticmethod
    def _rollout_result(generation: int, state: ServiceState) -> str:
        outcome = state.last_boot
        if outcome is not None and outcome.generation == generation:
            if outcome.ok:
                return f"rolled out to generation {generation}"
            return f"rolled back: {one_line(outcome.error) or f'generation {generation} failed'}"
        # No outcome recorded for it: judge by what serves now.
        if state.serving == generation:
            return f"rolled out to generation {generation}"
        return f"rolled back: generation {generation} did not become ready"

    def _send(self, now: float, *lines: str, status: str) -> None:
        status = one_line(status)
        self.last_status = status
        self.last_status_at = now
        self.notifier.notify(*lines, f"STATUS={status}")
