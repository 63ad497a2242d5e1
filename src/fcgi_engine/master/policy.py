"""The master's decisions as a pure function of events: no I/O, time is an argument.

Every row of the signal table, every rollout outcome and every timeout is decided here, so each
is a unit test; the loop only carries the actions out.

It also keeps the server's metrics (the snapshot's "metrics", whose schema fcgi_engine.metrics
documents): each generation's cumulative counts as its last Status said, plus the counts of the
generations that are gone, so no counter ever goes backwards; rollouts by outcome; the listen
queue as the loop samples it; and a recent request rate. Times are monotonic, as everywhere
here; the wall clock enters once (Started, Adopted) and wall-clock times are derived from it.

Leaving (TERM, `stop`): with drain_delay the server first serves on for that long, reporting
not ready, so a load balancer can take it out while nothing is refused; then StopAccepting (the
listener takes no new connection; the queued ones are still served) and StopGeneration for the
serving generation, which accepts its queue dry, closes its copies of the listener and finishes
its requests within graceful_timeout; the master exits once every generation is gone. Ready
(`ready()`) means: a generation has passed its proof and serves, and no stop has begun.
"""

from __future__ import annotations

import enum
import math
import signal
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from fcgi_engine.channel import (
    DURATION_BUCKETS,
    N_BUCKETS,
    RESTART_CAUSES,
    STATUS_CLASSES,
    RequestCounts,
    WorkerInfo,
)
from fcgi_engine.control import (
    ErrorResponse,
    Response,
    RolloutResponse,
    StatusResponse,
    StoppedResponse,
    response_wire,
    unhandled,
)

# A deadline that never comes (compares greater than any time).
NEVER = math.inf
# The generation kills its own workers at graceful_timeout; the master kills what is left of a
# draining generation this much later.
DRAIN_BACKSTOP = 5.0
# The request rate is measured over this many seconds.
RATE_WINDOW = 10.0
ZERO_COUNTS = RequestCounts.zero(len(STATUS_CLASSES), N_BUCKETS)


class Phase(enum.Enum):
    BOOTING = "booting"
    ACTIVE = "active"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass
class GenerationRecord:
    id: int
    phase: Phase
    started: float
    deadline: float = 0.0
    pids: list[int] = field(default_factory=list)
    workers: list[WorkerInfo] = field(default_factory=list)
    error: str = ""
    ready_at: float = 0.0
    counts: RequestCounts | None = None  # cumulative, as its last Status said
    restarts: dict[str, int] = field(default_factory=dict)
    release_dir: str | None = None  # the real path it booted from (None: no chdir)
    health: dict[str, Any] | None = None  # its own health check: {"path", "status"}


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class Started:
    now: float
    wall: float | None = None  # time.time() at `now` (None: wall-clock times are monotonic)


@dataclass(frozen=True)
class SignalReceived:
    signum: int
    now: float


@dataclass(frozen=True)
class RolloutRequested:
    now: float
    reply_to: Any = None


@dataclass(frozen=True)
class StopRequested:
    now: float
    fast: bool = False
    reply_to: Any = None


@dataclass(frozen=True)
class StatusRequested:
    now: float
    reply_to: Any


@dataclass(frozen=True)
class GenerationSpawned:
    """The generation's process started, in `release_dir` (None: no chdir configured)."""

    gen_id: int
    now: float
    release_dir: str | None = None


@dataclass(frozen=True)
class GenerationReady:
    gen_id: int
    now: float
    pids: list[int] = field(default_factory=list)
    workers: list[WorkerInfo] = field(default_factory=list)
    health: dict[str, Any] | None = None


@dataclass(frozen=True)
class GenerationFailed:
    gen_id: int
    now: float
    error: str
    health: dict[str, Any] | None = None


@dataclass(frozen=True)
class GenerationStatus:
    gen_id: int
    now: float
    workers: list[WorkerInfo]
    counts: RequestCounts | None = None
    restarts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationExited:
    gen_id: int
    now: float
    code: int
    output: str = ""


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class AdoptedGeneration:
    id: int
    phase: Phase
    pids: list[int] = field(default_factory=list)
    workers: list[WorkerInfo] = field(default_factory=list)
    started_at: float | None = None  # wall clock, when the previous image knew it


@dataclass(frozen=True)
class Adopted:
    """The master re-exec'd itself in place (USR2) and holds these generations again: the
    first event of the new image, instead of Started."""

    now: float
    generations: list[AdoptedGeneration]
    active: int | None
    next_id: int
    nproc: int
    wall: float | None = None
    # The previous image's Metrics.to_wire(): the totals survive the re-exec.
    metrics: dict[str, Any] | None = None


@dataclass(frozen=True)
class ListenQueueSampled:
    """The loop measured the listening socket's accept queue (None: cannot be measured)."""

    now: float
    length: int | None
    limit: int | None


Event = (
    Started
    | Adopted
    | SignalReceived
    | RolloutRequested
    | StopRequested
    | StatusRequested
    | GenerationSpawned
    | GenerationReady
    | GenerationFailed
    | GenerationStatus
    | GenerationExited
    | ListenQueueSampled
    | Tick
)

# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class SpawnGeneration:
    gen_id: int
    nproc: int


@dataclass(frozen=True)
class SignalGeneration:
    gen_id: int
    signum: int


@dataclass(frozen=True)
class ResizeGeneration:
    """Tell the generation how many workers to run (signals would coalesce; a count does not)."""

    gen_id: int
    nproc: int


@dataclass(frozen=True)
class KillGeneration:
    """SIGKILL the generation's whole process group."""

    gen_id: int


@dataclass(frozen=True)
class Reply:
    reply_to: Any
    payload: Response


@dataclass(frozen=True)
class NotifyStarted:
    """The first generation is ready (or failed): tell whoever waits on `serve --daemon`."""

    ok: bool
    message: str


@dataclass(frozen=True)
class Log:
    level: str
    message: str


@dataclass(frozen=True)
class ReopenLogs:
    pass


@dataclass(frozen=True)
class StopAccepting:
    """Make the listener take no new connection, while the connections queued in it can still
    be accepted (the loop unlinks a unix socket's path, filters a TCP listener's SYNs), and stop
    taking connections in the master."""


@dataclass(frozen=True)
class StopGeneration:
    """Drain the generation for a stop: tell it whether to serve the listen queue dry (channel
    Stop), then SIGTERM."""

    gen_id: int


@dataclass(frozen=True)
class ReExec:
    """Exec the master's image again now (the loop does it once this list is carried out)."""


@dataclass(frozen=True)
class Exit:
    code: int


Action = (
    SpawnGeneration
    | ResizeGeneration
    | SignalGeneration
    | KillGeneration
    | Reply
    | NotifyStarted
    | Log
    | ReopenLogs
    | StopAccepting
    | StopGeneration
    | ReExec
    | Exit
)


@dataclass
class Settings:
    name: str
    nproc: int
    boot_timeout: float = 30.0
    graceful_timeout: float = 30.0
    respawn_backoff: float = 1.0
    listen: str = ""  # the bound address, shown in the status ("127.0.0.1:43117", a path)
    pid: int = 0  # the master's
    drain_delay: float = 0.0  # seconds a graceful stop serves on, not ready, before leaving
    status_listen: str | None = None  # the status_listen address bound (HTTP probes)


@dataclass
class Metrics:
    """What the master counts beyond any one generation: the counts and restarts of the
    generations that are gone, rollouts by outcome, the listen queue, recent totals for the
    rate. `to_wire`/`from_wire` carry it across a re-exec of the master."""

    gone: RequestCounts = ZERO_COUNTS
    gone_restarts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESTART_CAUSES, 0))
    rollouts: dict[str, int] = field(default_factory=lambda: {"rolled_out": 0, "rolled_back": 0})
    queue_now: int | None = None
    queue_max: int | None = None
    queue_limit: int | None = None
    started_wall: float | None = None
    # (monotonic time, requests ended so far), oldest first, spanning RATE_WINDOW.
    totals: deque[tuple[float, int]] = field(default_factory=deque)

    def to_wire(self) -> dict[str, Any]:
        return {
            "gone": self.gone.to_wire(),
            "gone_restarts": self.gone_restarts,
            "rollouts": self.rollouts,
            "queue_max": self.queue_max,
            "started_wall": self.started_wall,
        }

    @classmethod
    def from_wire(cls, obj: dict[str, Any]) -> Metrics:
        metrics = cls()
        try:
            metrics.gone = RequestCounts.from_wire(
                obj.get("gone", {}), len(STATUS_CLASSES), N_BUCKETS
            )
        except ValueError:
            pass
        for mine, theirs in (
            (metrics.gone_restarts, obj.get("gone_restarts")),
            (metrics.rollouts, obj.get("rollouts")),
        ):
            if isinstance(theirs, dict):
                mine.update({k: v for k, v in theirs.items() if isinstance(v, int)})
        if isinstance(obj.get("queue_max"), int):
            metrics.queue_max = obj["queue_max"]
        if isinstance(obj.get("started_wall"), (int, float)):
            metrics.started_wall = float(obj["started_wall"])
        return metrics


class MasterPolicy:
    def __init__(self, settings: Settings, next_id: int = 1) -> None:
        self.settings = settings
        self.nproc = settings.nproc
        self.generations: dict[int, GenerationRecord] = {}
        self.active: int | None = None
        self.booting: int | None = None
        self.next_id = next_id
        self.stopping = False
        self.started_ok = False
        self.started_at = 0.0
        self.waiters: list[Any] = []
        self.stop_waiters: list[Any] = []
        self.last_rollout: RolloutResponse | None = None
        self.crash_count = 0
        self.respawn_at: float | None = None
        self.exit_code = 0
        # Rollout replies held until the old generation is gone: (waiter, outcome, boot start).
        self.drain_waiters: dict[int, list[tuple[Any, RolloutResponse, float]]] = {}
        # A HUP while a generation boots: one more rollout is wanted once that boot ends. A
        # flag, not a count: any number of HUPs during one boot ask for the same thing (boot
        # whatever is deployed now), so they coalesce into one rollout.
        self.rollout_queued = False
        # A USR2 taken: the re-exec happens at the next Tick unless a boot or a stop began
        # meanwhile (the image must not change under a rollout).
        self.reexec_wanted = False
        self.metrics = Metrics()
        # time.time() - time.monotonic(), fixed once (Started, Adopted): wall-clock times.
        self.wall_offset = 0.0
        # A graceful stop: when it was asked for, and until when it serves on (drain_delay).
        self.stopping_since: float | None = None
        self.drain_until: float | None = None
        self.accepting_stopped = False

    # ------------------------------------------------------------ helpers

    def _spawn(self, now: float) -> list[Action]:
        gen_id = self.next_id
        self.next_id += 1
        self.generations[gen_id] = GenerationRecord(
            gen_id, Phase.BOOTING, now, deadline=now + self.settings.boot_timeout
        )
        self.booting = gen_id
        # Whatever boots now supersedes a respawn scheduled earlier.
        self.respawn_at = None
        return [
            SpawnGeneration(gen_id, self.nproc),
            Log("info", f"{self.settings.name}: booting generation {gen_id}"),
        ]

    def _name(self) -> str:
        return self.settings.name

    def wall(self, monotonic: float) -> float:
        """The wall-clock time of a monotonic one."""
        return round(monotonic + self.wall_offset, 3)

    def ready(self) -> bool:
        """A generation passed its proof and serves, and no stop has begun (a graceful rollout
        keeps it: the old generation serves until the new one is proven)."""
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """Why the server is not ready, for /readyz; None when it is."""
        if self.stopping:
            if self.drain_until is not None:
                return "stopping: drain_delay runs, then it stops accepting"
            return "stopping"
        if self.active is None:
            if self.booting is not None:
                return f"generation {self.booting} is booting"
            return "no generation serves"
        return None

    def _worker_wire(self, worker: WorkerInfo, now: float) -> dict[str, Any]:
        wire = worker.to_wire()
        request = worker.request
        wire["started_at"] = worker.started_at or None
        wire["request"] = (
            {
                "method": request.method,
                "uri": request.uri,
                "running_for": round(max(0.0, self.wall(now) - request.started_at), 3),
            }
            if request is not None
            else None
        )
        return wire

    def snapshot(self, now: float) -> dict[str, Any]:
        gens = []
        for rec in sorted(self.generations.values(), key=lambda r: r.id):
            gens.append(
                {
                    "id": rec.id,
                    "phase": rec.phase.value,
                    "age": round(now - rec.started, 3),
                    "workers": [self._worker_wire(w, now) for w in rec.workers],
                    "pids": rec.pids,
                    "started_at": self.wall(rec.started),
                }
            )
        active = self.generations.get(self.active) if self.active else None
        workers = active.workers if active else []
        started_wall = self.metrics.started_wall
        return {
            "pid": self.settings.pid,
            "started_at": started_wall if started_wall is not None else self.wall(self.started_at),
            "metrics": self.metrics_snapshot(now),
            "name": self._name(),
            "listen": self.settings.listen,
            "status_listen": self.settings.status_listen,
            "state": "stopping" if self.stopping else ("running" if active else "starting"),
            "generation": self.active,
            "booting": self.booting,
            "nproc": self.nproc,
            "workers": [self._worker_wire(w, now) for w in workers],
            "workers_ready": len(workers),
            "requests": sum(w.requests for w in workers),
            # From the wall clock the master started at: a re-exec does not reset it.
            "uptime": round(
                self.wall(now) - started_wall
                if started_wall is not None
                else now - self.started_at,
                3,
            ),
            "generations": gens,
            "last_rollout": (
                response_wire(self.last_rollout) if self.last_rollout is not None else None
            ),
            "rollout_queued": self.rollout_queued,
            "ready": self.ready(),
            "not_ready_reason": self.not_ready_reason(),
            "stopping_at": (
                self.wall(self.stopping_since) if self.stopping_since is not None else None
            ),
            "drain_delay_until": (
                self.wall(self.drain_until) if self.drain_until is not None else None
            ),
        }

    def _counts(self) -> RequestCounts:
        total = self.metrics.gone
        for rec in self.generations.values():
            if rec.counts is not None:
                total = total.plus(rec.counts)
        return total

    def _sample_total(self, now: float) -> None:
        """Remember the requests ended so far, for the rate over the last RATE_WINDOW."""
        totals = self.metrics.totals
        if totals and now - totals[-1][0] < 0.25:
            return
        totals.append((now, sum(self._counts().by_class)))
        # Keep one sample older than the window, so the rate spans all of it.
        while len(totals) > 2 and now - totals[1][0] > RATE_WINDOW:
            totals.popleft()

    def metrics_snapshot(self, now: float) -> dict[str, Any]:
        """The snapshot's "metrics" (schema: fcgi_engine.metrics)."""
        m = self.metrics
        counts = self._counts()
        total = sum(counts.by_class)
        rate = 0.0
        if m.totals:
            then, before = m.totals[0]
            if now - then >= 1.0:
                rate = max(0, total - before) / (now - then)
        cumulative = 0
        buckets: list[list[Any]] = []
        for bound, n in zip([*DURATION_BUCKETS, "+Inf"], counts.buckets, strict=False):
            cumulative += n
            buckets.append([bound, cumulative])
        restarts = dict(m.gone_restarts)
        for rec in self.generations.values():
            for cause, n in rec.restarts.items():
                restarts[cause] = restarts.get(cause, 0) + n
        in_flight = sum(
            w.in_flight or (w.state == "busy")
            for rec in self.generations.values()
            for w in rec.workers
        )
        return {
            "requests": dict(zip(STATUS_CLASSES, counts.by_class, strict=False)),
            "requests_per_second": round(rate, 3),
            "in_flight": in_flight,
            "duration": {
                "buckets": buckets,
                "sum": round(counts.duration_sum, 6),
                "count": sum(counts.buckets),
            },
            "listen_queue": {"now": m.queue_now, "max": m.queue_max, "limit": m.queue_limit},
            "restarts": restarts,
            "rollouts": dict(m.rollouts),
        }

    # ------------------------------------------------------------ the decision

    def handle(self, event: Event) -> list[Action]:
        match event:
            case Started():
                return self._on_started(event)
            case Adopted():
                return self._on_adopted(event)
            case SignalReceived():
                return self._on_signal(event)
            case RolloutRequested():
                return self._on_rollout_requested(event)
            case StopRequested():
                return self._on_stop_requested(event)
            case StatusRequested():
                return [Reply(event.reply_to, StatusResponse(self.snapshot(event.now)))]
            case GenerationSpawned():
                rec = self.generations.get(event.gen_id)
                if rec is not None:
                    rec.release_dir = event.release_dir
                return []
            case GenerationReady():
                return self._on_generation_ready(event)
            case GenerationFailed():
                return self._on_generation_failed(event)
            case GenerationStatus():
                return self._on_generation_status(event)
            case GenerationExited():
                return self._on_generation_exited(event)
            case ListenQueueSampled():
                return self._on_listen_queue(event)
            case Tick():
                return self._on_tick(event)
            case _:
                unhandled(event)

    def _on_started(self, ev: Started) -> list[Action]:
        self.started_at = ev.now
        if ev.wall is not None:
            self.wall_offset = ev.wall - ev.now
            self.metrics.started_wall = round(ev.wall, 3)
        return self._spawn(ev.now)

    def _on_adopted(self, ev: Adopted) -> list[Action]:
        self.started_at = ev.now
        if ev.metrics is not None:
            self.metrics = Metrics.from_wire(ev.metrics)
        if ev.wall is not None:
            self.wall_offset = ev.wall - ev.now
            if self.metrics.started_wall is None:
                self.metrics.started_wall = round(ev.wall, 3)
        self.started_ok = True
        self.next_id = ev.next_id
        self.nproc = ev.nproc
        for g in ev.generations:
            # Its start as a monotonic time of this image, from the wall clock it started at.
            started = ev.now
            if g.started_at is not None and ev.wall is not None:
                started = min(ev.now, g.started_at - self.wall_offset)
            self.generations[g.id] = GenerationRecord(
                g.id,
                g.phase,
                started,
                deadline=ev.now + self.settings.graceful_timeout,
                pids=list(g.pids),
                workers=list(g.workers),
                ready_at=ev.now,
            )
        self.active = ev.active if ev.active in self.generations else None
        if self.active is None:
            return self._spawn(ev.now)
        return []

    def _on_signal(self, ev: SignalReceived) -> list[Action]:
        sig = ev.signum
        if sig == signal.SIGHUP:
            return self._on_rollout_requested(RolloutRequested(ev.now))
        if sig == signal.SIGTERM:
            return self._on_stop_requested(StopRequested(ev.now))
        if sig in (signal.SIGINT, signal.SIGQUIT):
            return self._on_stop_requested(StopRequested(ev.now, fast=True))
        if sig in (signal.SIGTTIN, signal.SIGTTOU):
            if sig == signal.SIGTTOU and self.nproc <= 1:
                return [Log("warning", f"{self._name()}: TTOU ignored, 1 worker is the minimum")]
            self.nproc += 1 if sig == signal.SIGTTIN else -1
            actions: list[Action] = [Log("info", f"{self._name()}: workers now {self.nproc}")]
            if self.active is not None:
                actions.append(ResizeGeneration(self.active, self.nproc))
            return actions
        if sig == signal.SIGUSR1:
            actions = [ReopenLogs()]
            # Not to a booting generation: it may not handle USR1 yet (the default kills), and
            # it opens its logs fresh anyway.
            actions += [
                SignalGeneration(g, signal.SIGUSR1)
                for g, rec in self.generations.items()
                if rec.phase is not Phase.BOOTING
            ]
            return actions
        if sig == signal.SIGUSR2:
            if self.booting is not None or self.stopping:
                return [Log("warning", f"{self._name()}: USR2 ignored during a rollout or stop")]
            self.reexec_wanted = True
            if self._callers_waiting():
                return [
                    Log(
                        "info",
                        f"{self._name()}: re-executing the master in place once the rollout "
                        "in progress has answered",
                    )
                ]
            return [Log("info", f"{self._name()}: re-executing the master in place")]
        return []

    def _reexec_due(self) -> list[Action]:
        """The USR2 taken earlier, unless a boot or a stop began since (one batch of signals
        can hold a USR2 and then a HUP). While a caller waits for its answer (a graceful whose
        old generation still drains), it waits too: an exec would close that connection
        unanswered."""
        if not self.reexec_wanted or self._callers_waiting():
            return []
        self.reexec_wanted = False
        if self.booting is not None or self.stopping:
            return [Log("warning", f"{self._name()}: re-exec dropped: a rollout or stop began")]
        return [ReExec()]

    def _callers_waiting(self) -> bool:
        return bool(self.waiters or self.stop_waiters or any(self.drain_waiters.values()))

    def _on_rollout_requested(self, ev: RolloutRequested) -> list[Action]:
        if self.stopping:
            return self._refuse(ev.reply_to, "the server is stopping")
        if self.booting is not None:
            if ev.reply_to is not None:
                # Refused, not queued: the caller is told which rollout is running.
                return self._refuse(
                    ev.reply_to,
                    f"a rollout is already running (generation {self.booting} is booting)",
                )
            # A HUP has nobody to tell "try again", so dropping it would lose a deploy that
            # signalled just after a start or another rollout: remember it instead.
            already = self.rollout_queued
            self.rollout_queued = True
            return [
                Log(
                    "info",
                    f"{self._name()}: HUP while generation {self.booting} boots: "
                    + (
                        "a rollout is already queued after it"
                        if already
                        else "rollout queued to start when that boot ends"
                    ),
                )
            ]
        if ev.reply_to is not None:
            self.waiters.append(ev.reply_to)
        return self._spawn(ev.now)

    def _refuse(self, reply_to: Any, error: str) -> list[Action]:
        if reply_to is None:
            return [Log("warning", f"{self._name()}: {error}")]
        return [Reply(reply_to, ErrorResponse(error))]

    def _on_stop_requested(self, ev: StopRequested) -> list[Action]:
        actions: list[Action] = []
        if ev.reply_to is not None:
            self.stop_waiters.append(ev.reply_to)
        first = not self.stopping
        self.stopping = True
        if first:
            self.stopping_since = ev.now
            actions.append(
                Log("info", f"{self._name()}: stopping ({'fast' if ev.fast else 'graceful'})")
            )
        if self.booting is not None:
            actions += self._fail_booting(ev.now, "the server is stopping")
        if ev.fast:
            # A fast stop ends a drain_delay too.
            self.drain_until = None
            actions += self._stop_accepting()
            actions += [
                SignalGeneration(rec.id, signal.SIGQUIT) for rec in self.generations.values()
            ]
        elif first and self.settings.drain_delay > 0 and self.active is not None:
            # Serve on, not ready, while the load balancer learns; Tick ends it.
            self.drain_until = ev.now + self.settings.drain_delay
            actions.append(
                Log(
                    "info",
                    f"{self._name()}: serving {self.settings.drain_delay:g} s more "
                    "(drain_delay), reporting not ready, before it stops accepting",
                )
            )
        elif self.drain_until is None:
            actions += self._leave(ev.now)
        if not self.started_ok:
            actions.append(NotifyStarted(False, "stopped before it was ready"))
        actions += self._maybe_exit()
        return actions

    def _stop_accepting(self) -> list[Action]:
        if self.accepting_stopped:
            return []
        self.accepting_stopped = True
        return [StopAccepting()]

    def _leave(self, now: float) -> list[Action]:
        """The graceful stop proper: take no new connection, serve the queued ones, drain."""
        actions = self._stop_accepting()
        for rec in self.generations.values():
            if rec.phase is Phase.ACTIVE:
                rec.phase = Phase.DRAINING
                rec.deadline = now + self.settings.graceful_timeout
                actions.append(StopGeneration(rec.id))
        return actions

    def _on_generation_ready(self, ev: GenerationReady) -> list[Action]:
        rec = self.generations.get(ev.gen_id)
        if rec is None or ev.gen_id != self.booting:
            return []
        rec.phase = Phase.ACTIVE
        rec.pids = list(ev.pids)
        rec.workers = list(ev.workers)
        rec.ready_at = ev.now
        old = self.active
        self.active = ev.gen_id
        self.booting = None
        self.crash_count = 0
        boot_time = round(ev.now - rec.started, 3)
        actions: list[Action] = [
            Log(
                "info",
                f"{self._name()}: generation {ev.gen_id} ready in {boot_time} s, "
                f"{len(ev.pids)} workers",
            )
        ]
        if len(ev.pids) != self.nproc:
            # TTIN/TTOU arrived while it booted.
            actions.append(ResizeGeneration(ev.gen_id, self.nproc))
        if old is not None and old in self.generations:
            old_rec = self.generations[old]
            old_rec.phase = Phase.DRAINING
            old_rec.deadline = ev.now + self.settings.graceful_timeout
            actions.append(SignalGeneration(old, signal.SIGHUP))
        rec.health = ev.health
        outcome = RolloutResponse(
            ok=True,
            from_gen=old,
            to_gen=ev.gen_id,
            workers=len(ev.pids),
            boot_seconds=boot_time,
            release_dir=rec.release_dir,
            health=rec.health,
        )
        if old is not None or self.waiters:
            self.last_rollout = outcome
            self.metrics.rollouts["rolled_out"] += 1
        if old is not None and old in self.generations:
            # Answered once the old generation is gone: "ok" means the rollout is complete.
            self.drain_waiters.setdefault(old, []).extend(
                (waiter, outcome, rec.started) for waiter in self.waiters
            )
        else:
            for waiter in self.waiters:
                actions.append(Reply(waiter, outcome))
        self.waiters = []
        if not self.started_ok:
            self.started_ok = True
            actions.append(NotifyStarted(True, f"generation {ev.gen_id} ready"))
        actions += self._run_queued_rollout(ev.now, ev.gen_id)
        return actions

    def _run_queued_rollout(self, now: float, ended: int) -> list[Action]:
        """The boot of generation `ended` is over (ready or failed): start the rollout a HUP
        queued during it, unless the server is stopping or a respawn will boot fresh code anyway."""
        if not self.rollout_queued:
            return []
        self.rollout_queued = False
        if self.stopping:
            return [Log("info", f"{self._name()}: queued rollout dropped: the server is stopping")]
        if self.booting is not None or self.respawn_at is not None:
            # The next boot re-resolves the app after the HUP, which is all the HUP asked for.
            return [
                Log("info", f"{self._name()}: queued rollout served by the next generation boot")
            ]
        return [
            Log("info", f"{self._name()}: starting the rollout queued during generation {ended}")
        ] + self._spawn(now)

    def _fail_booting(self, now: float, error: str) -> list[Action]:
        gen_id = self.booting
        assert gen_id is not None
        rec = self.generations[gen_id]
        rec.phase = Phase.FAILED
        rec.error = rec.error or error
        self.booting = None
        actions: list[Action] = [
            KillGeneration(gen_id),
            Log("error", f"{self._name()}: generation {gen_id} failed: {rec.error}"),
        ]
        outcome = RolloutResponse(
            ok=False,
            from_gen=self.active,
            to_gen=gen_id,
            error=rec.error,
            rolled_back=self.active is not None,
            boot_seconds=round(now - rec.started, 3),
            release_dir=rec.release_dir,
            health=rec.health,
        )
        self.last_rollout = outcome
        if outcome.rolled_back and not self.stopping:
            self.metrics.rollouts["rolled_back"] += 1
        for waiter in self.waiters:
            actions.append(Reply(waiter, outcome))
        self.waiters = []
        if not self.started_ok and self.active is None and not self.stopping:
            if self.crash_count == 0:
                # The first boot failed: nothing serves; `serve` exits non-zero naming why.
                actions.append(NotifyStarted(False, rec.error))
                self.stopping = True
                self.exit_code = 1
                actions += self._maybe_exit()
            else:
                actions += self._schedule_respawn(now)
        elif self.active is None and not self.stopping:
            actions += self._schedule_respawn(now)
        actions += self._run_queued_rollout(now, gen_id)
        return actions

    def _schedule_respawn(self, now: float) -> list[Action]:
        self.crash_count += 1
        delay = min(self.settings.respawn_backoff * 2 ** (self.crash_count - 1), 30.0)
        self.respawn_at = now + delay
        return [
            Log(
                "error", f"{self._name()}: no generation serves; booting a new one in {delay:.1f} s"
            )
        ]

    def _on_generation_failed(self, ev: GenerationFailed) -> list[Action]:
        rec = self.generations.get(ev.gen_id)
        if rec is None:
            return []
        rec.error = ev.error
        if ev.health is not None:
            rec.health = ev.health
        if ev.gen_id == self.booting:
            return self._fail_booting(ev.now, ev.error)
        return []

    def _on_generation_status(self, ev: GenerationStatus) -> list[Action]:
        rec = self.generations.get(ev.gen_id)
        if rec is not None:
            rec.workers = list(ev.workers)
            if ev.counts is not None:
                rec.counts = ev.counts
            if ev.restarts:
                rec.restarts = dict(ev.restarts)
            self._sample_total(ev.now)
        return []

    def _on_listen_queue(self, ev: ListenQueueSampled) -> list[Action]:
        m = self.metrics
        m.queue_now, m.queue_limit = ev.length, ev.limit
        if ev.length is not None:
            m.queue_max = max(ev.length, m.queue_max or 0)
        return []

    def _on_generation_exited(self, ev: GenerationExited) -> list[Action]:
        rec = self.generations.pop(ev.gen_id, None)
        if rec is None:
            return []
        # What it counted stays counted.
        if rec.counts is not None:
            self.metrics.gone = self.metrics.gone.plus(rec.counts)
        for cause, n in rec.restarts.items():
            self.metrics.gone_restarts[cause] = self.metrics.gone_restarts.get(cause, 0) + n
        actions: list[Action] = []
        if ev.gen_id == self.booting:
            self.generations[ev.gen_id] = rec
            if not rec.error:
                rec.error = (
                    ev.output.strip()
                    or f"the generation exited with status {ev.code} before it was ready"
                )
            actions += self._fail_booting(ev.now, rec.error)
            self.generations.pop(ev.gen_id, None)
        elif ev.gen_id == self.active:
            self.active = None
            if not self.stopping:
                actions.append(
                    Log(
                        "error",
                        f"{self._name()}: generation {ev.gen_id} exited "
                        f"unexpectedly (status {ev.code})",
                    )
                )
                if self.booting is None:
                    actions += self._spawn(ev.now)
                else:
                    # Spawning here would orphan the booting generation (its ready would be
                    # ignored); it takes over when ready, or its failure schedules a respawn.
                    actions.append(
                        Log(
                            "info",
                            f"{self._name()}: generation {self.booting} is booting and takes "
                            "over when ready",
                        )
                    )
        elif rec.phase is Phase.DRAINING:
            actions.append(Log("info", f"{self._name()}: generation {ev.gen_id} drained"))
        for waiter, outcome, started in self.drain_waiters.pop(ev.gen_id, []):
            actions.append(Reply(waiter, replace(outcome, seconds=round(ev.now - started, 3))))
        actions += self._maybe_exit()
        return actions

    def _maybe_exit(self) -> list[Action]:
        if (
            not self.stopping
            or self.generations
            and any(r.phase is not Phase.FAILED for r in self.generations.values())
        ):
            return []
        if any(r.phase is Phase.FAILED for r in self.generations.values()):
            # Wait for the killed generation to be reaped first.
            return []
        actions: list[Action] = [Reply(w, StoppedResponse()) for w in self.stop_waiters]
        self.stop_waiters = []
        return actions + [Exit(self.exit_code)]

    def _on_tick(self, ev: Tick) -> list[Action]:
        actions: list[Action] = []
        if self.drain_until is not None and ev.now >= self.drain_until:
            self.drain_until = None
            actions.append(Log("info", f"{self._name()}: drain_delay over: stops accepting"))
            actions += self._leave(ev.now)
        if self.booting is not None:
            rec = self.generations[self.booting]
            if ev.now > rec.deadline:
                actions += self._fail_booting(
                    ev.now, f"not ready within boot_timeout ({self.settings.boot_timeout:g} s)"
                )
        for rec in list(self.generations.values()):
            if rec.phase is Phase.DRAINING and ev.now > rec.deadline + DRAIN_BACKSTOP:
                # The generation kills its own workers at graceful_timeout; this is the backstop,
                # once: the reap of the killed generation ends its record.
                rec.deadline = NEVER
                actions.append(KillGeneration(rec.id))
                actions.append(
                    Log(
                        "warning",
                        f"{self._name()}: generation {rec.id} did not drain in time; killed",
                    )
                )
        if (
            self.respawn_at is not None
            and ev.now >= self.respawn_at
            and self.booting is None
            and self.active is None
            and not self.stopping
        ):
            self.respawn_at = None
            actions += self._spawn(ev.now)
        return actions + self._reexec_due()
