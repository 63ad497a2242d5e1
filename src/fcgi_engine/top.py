"""`fcgi-engine top`: a live view of running servers, like uwsgitop, refreshed every interval.

The contract: `render(views, now)` turns status snapshots (what `status --json` shows) into one
frame of text, pure and tested with sample snapshots; `run(...)` probes the servers every
`interval` seconds and prints frames until q, Ctrl-C or (with `once`) the first frame. A frame
has a header per server (generation and its age, workers busy/idle/draining, the listen queue
now/max, requests per second, in flight) and a line per worker (pid, state, requests, the
request it runs and for how long). Every key a snapshot lacks (an older master) is left out.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from fcgi_engine.manager import (
    Outcome,
    duration_text,
    listen_queue_text,
    metrics_of,
    requests_by_class,
)

CLEAR = "\x1b[H\x1b[2J"  # cursor home, erase the screen


@dataclass
class View:
    """One server as one probe saw it: its status Outcome (its snapshot in `data` when it runs)
    and when the probe was made (time.monotonic())."""

    outcome: Outcome
    at: float

    @property
    def status(self) -> dict[str, Any]:
        return self.outcome.data if self.outcome.data.get("state") == "running" else {}


@dataclass
class Rates:
    """Requests per second per server, from the requests counted by two snapshots."""

    last: dict[str, tuple[float, int]] = field(default_factory=dict)  # name -> (at, requests)

    def update(self, view: View) -> float | None:
        """The rate since this server's previous view; None without one (or after a restart
        of the master, whose counters start over)."""
        total = requests_total(view.status)
        if total is None:
            return None
        name = view.outcome.name
        before = self.last.get(name)
        self.last[name] = (view.at, total)
        if before is None or view.at <= before[0] or total < before[1]:
            return None
        return (total - before[1]) / (view.at - before[0])


def requests_total(status: dict[str, Any]) -> int | None:
    """Requests the master counted since it started (its metrics), else those the active
    generation's workers served (an older master: drops at a rollout, caught by Rates)."""
    by_class = metrics_of(status).get("requests")
    if isinstance(by_class, dict):
        return sum(v for v in by_class.values() if isinstance(v, int))
    total = status.get("requests")
    return total if isinstance(total, int) else None


def header(status: dict[str, Any], rate: float | None) -> str:
    """The server's summary: pid, generation and its age, workers, queue, rate, in flight."""
    parts = []
    if status.get("pid"):
        parts.append(f"pid {status['pid']}")
    gen = status.get("generation")
    if gen is not None:
        age = next(
            (g.get("age") for g in status.get("generations", []) if g.get("id") == gen), None
        )
        parts.append(f"generation {gen}" + (f" (up {duration_text(age)})" if age else ""))
    if status.get("booting"):
        parts.append(f"booting {status['booting']}")
    workers = status.get("workers", [])
    states = [w.get("state") for w in workers]
    counts = [f"{states.count(s)} {s}" for s in ("busy", "idle", "draining") if s in states]
    workers_text = f"workers {len(workers)}/{status.get('nproc', len(workers))}"
    parts.append(workers_text + (f" ({', '.join(counts)})" if counts else ""))
    queue = listen_queue_text(status)
    if queue:
        parts.append(queue)
    metrics = metrics_of(status)
    if rate is None:
        rate = metrics.get("requests_per_second")  # the master's own, for a first frame
    if isinstance(rate, (int, float)):
        parts.append(f"{rate:.1f} req/s")
    if isinstance(metrics.get("in_flight"), int):
        parts.append(f"{metrics['in_flight']} in flight")
    total = requests_total(status)
    if total is not None:
        classes = requests_by_class(status)
        detail = " ".join(f"{k} {v}" for k, v in classes.items())
        parts.append(f"{total} requests" + (f" ({detail})" if detail else ""))
    return "  ".join(parts)


WORKER_COLUMNS = f"  {'PID':>8}  {'STATE':<8}  {'REQS':>7}  {'AGE':>7}  {'RUNNING':>7}  REQUEST"


def worker_line(worker: dict[str, Any], wall_now: float) -> str:
    """pid, state, requests served, age, and the request it runs (method, URI, for how long)."""
    started = worker.get("started_at")
    age = duration_text(wall_now - started) if isinstance(started, (int, float)) else "-"
    current = worker.get("request")
    running, what = "-", ""
    if isinstance(current, dict):
        seconds = current.get("running_for")
        if isinstance(seconds, (int, float)):
            running = f"{seconds:.1f}s"
        what = f"{current.get('method', '')} {current.get('uri', '')}".strip()
    return (
        f"  {worker.get('pid', '?'):>8}  {str(worker.get('state', '?')):<8}  "
        f"{worker.get('requests', 0):>7}  {age:>7}  {running:>7}  {what}"
    ).rstrip()


def render(
    views: Sequence[View], rates: Rates, wall_now: float, width: int = 0, title: str = ""
) -> str:
    """One frame: per server a header and its workers; lines cut to `width` when given."""
    lines = [title] if title else []
    for view in views:
        status = view.status
        name = view.outcome.name
        if not status:
            lines.append(f"{name}: {view.outcome.message}")
            continue
        lines.append(f"{name}: {header(status, rates.update(view))}")
        workers = status.get("workers", [])
        if workers:
            lines.append(WORKER_COLUMNS)
            lines += [worker_line(w, wall_now) for w in workers]
        lines.append("")
    if width > 0:
        lines = [line[:width] for line in lines]
    return "\n".join(lines).rstrip("\n") + "\n"


def run(
    probe_all: Callable[[], list[Outcome]],
    *,
    interval: float = 1.0,
    once: bool = False,
    out: TextIO | None = None,
    keys: TextIO | None = None,
) -> int:
    """Print a frame every `interval` seconds until q (from `keys`, when a terminal), Ctrl-C,
    or after the first one with `once`. Returns the exit code: 0, or the worst status code
    of the first frame with `once` (so scripts see a server that is not running)."""
    out = out or sys.stdout
    keys = keys if keys is not None else sys.stdin
    live = out.isatty() and not once
    rates = Rates()
    restore = _cbreak(keys) if live else None
    try:
        while True:
            outcomes = probe_all()
            now = time.monotonic()
            views = [View(o, now) for o in outcomes]
            title = ""
            if live:
                stamp = time.strftime("%H:%M:%S")
                title = f"fcgi-engine top - {stamp} - every {interval:g} s, q quits"
            width = os.get_terminal_size(out.fileno()).columns if live else 0
            frame = render(views, rates, time.time(), width=width, title=title)
            out.write((CLEAR if live else "") + frame)
            out.flush()
            if once:
                codes = [int(o.code) for o in outcomes]
                return max(codes, default=0)
            if _wait_for_quit(keys if restore is not None else None, interval):
                return 0
            if not live:
                out.write("\n")  # frames one after the other in a log or a pipe
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # `top | head`: the reader is gone, so are we; nothing left to flush at exit.
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, out.fileno())
        os.close(null)
        return 0
    finally:
        if restore is not None:
            restore()


def _cbreak(keys: TextIO) -> Callable[[], None] | None:
    """Read keys one at a time (q quits) without echo; returns what restores the terminal."""
    try:
        if not keys.isatty():
            return None
        fd = keys.fileno()
        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
    except (OSError, ValueError, termios.error):
        return None
    return lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_quit(keys: TextIO | None, interval: float) -> bool:
    """Wait `interval` seconds, or less when q (or Q) is typed; True when it was."""
    deadline = time.monotonic() + interval
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if keys is None:
            time.sleep(left)  # nothing to read keys from: only Ctrl-C ends it
            return False
        ready, _, _ = select.select([keys.fileno()], [], [], left)
        if ready:
            char = os.read(keys.fileno(), 1)
            if char in (b"q", b"Q") or not char:
                return True
