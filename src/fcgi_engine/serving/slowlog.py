"""The slowlog (PHP-FPM's request_slowlog_timeout): the Python stack of a request that has run
longer than `slowlog_timeout`, written while it goes on.

A worker with slowlog_timeout > 0 keeps a SlowLog: its requests note their start (begin) and
end (end) in a registry, keyed by what runs them (the thread id of a WSGI request, the asyncio
task of an ASGI one). A watchdog daemon thread, started after the fork (start), wakes every
min(timeout / 4, 0.5) s and writes one entry per request past the timeout, once per request:

    2025-01-02T10:00:00+0000 slow request: pid 1234, GET /report?month=1 running for 0.52 s
    (slowlog_timeout 0.5 s); its stack, most recent call last:
      File "/srv/app/views.py", line 12, in report
        time.sleep(1.5)

The stack of a thread is read with sys._current_frames(); that of a task by following its
coroutine's awaits (an asyncio task's get_stack() shows only the outermost coroutine of a
suspended task); a task that is running now (it blocks the loop) is shown by the loop thread's
stack. Nothing stops or slows the request: the watchdog only reads. Each entry is one write(2)
to the slowlog file (O_APPEND) or, without one, to stderr (the error log). A worker without a
slowlog_timeout has no SlowLog, no registry and no thread.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Imported where a task's stack is read: a WSGI worker never loads asyncio for this.
    import asyncio

from fcgi_engine.system.logfile import open_log

log = logging.getLogger("fcgi_engine.worker")

# The watchdog wakes at least this often, so an entry is late by at most this (or timeout / 4).
MAX_INTERVAL = 0.5


class _Running:
    """One request in flight: what it is, since when, and whether its entry was written."""

    __slots__ = ("started", "method", "uri", "logged")

    def __init__(self, started: float, method: str, uri: str) -> None:
        self.started = started
        self.method = method
        self.uri = uri
        self.logged = False


class SlowLog:
    """The requests in flight of one worker and the watchdog that writes the slow ones to
    `path` (None: stderr). begin() and end() may be called from any thread."""

    def __init__(self, path: str | None, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.interval = min(timeout / 4, MAX_INTERVAL)
        self.fd = 2
        self._owned_fd = False
        self._running: dict[Any, _Running] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The thread an ASGI worker's loop runs in: where a task that blocks the loop is seen.
        self.loop_thread = threading.get_ident()
        self.reopen()

    # ------------------------------------------------------------ the request path

    def begin(self, key: Any, method: str, uri: str) -> None:
        """The request run by `key` (a thread id, or an asyncio task) has started."""
        entry = _Running(time.monotonic(), method, uri)
        with self._lock:
            self._running[key] = entry

    def end(self, key: Any) -> None:
        with self._lock:
            self._running.pop(key, None)

    # ------------------------------------------------------------ the watchdog

    def start(self) -> None:
        """Start the watchdog (in the worker, after the fork: threads do not survive one)."""
        if self._thread is not None:
            return
        self.loop_thread = threading.get_ident()
        self._thread = threading.Thread(target=self._watch, name="slowlog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def reopen(self) -> None:
        """Open the slowlog file (again, after log rotation: USR1); stderr without a path.
        OSError when it cannot be opened (the old descriptor stays in use)."""
        if not self.path:
            return
        fd = open_log(self.path)
        if self._owned_fd:
            os.close(self.fd)
        self.fd = fd
        self._owned_fd = True

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check(time.monotonic())
            except Exception:  # noqa: BLE001 - the watchdog must outlive any one failure
                log.exception("slowlog watchdog failed")

    def check(self, now: float) -> int:
        """Write an entry for each request past the timeout that has none yet; how many."""
        due = now - self.timeout
        with self._lock:
            slow = [
                (key, entry)
                for key, entry in self._running.items()
                if not entry.logged and entry.started <= due
            ]
            for _key, entry in slow:
                entry.logged = True
        for key, entry in slow:
            self._write(self._entry(key, entry, now))
        return len(slow)

    def _entry(self, key: Any, entry: _Running, now: float) -> str:
        stack = self._stack(key)
        head = (
            f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} slow request: pid {os.getpid()}, "
            f"{entry.method} {entry.uri} running for {now - entry.started:.2f} s "
            f"(slowlog_timeout {self.timeout:g} s); "
        )
        if not stack:
            return head + "its stack could not be read (it just ended)\n\n"
        return head + "its stack, most recent call last:\n" + "".join(stack) + "\n"

    def _stack(self, key: Any) -> list[str]:
        if not isinstance(key, int):  # an asyncio task (a WSGI request's key is a thread id)
            return task_stack(key, self.loop_thread)
        frame = sys._current_frames().get(key)
        return traceback.format_stack(frame) if frame is not None else []

    def _write(self, text: str) -> None:
        try:
            os.write(self.fd, text.encode("utf-8", "replace"))
        except OSError as exc:
            log.error("cannot write the slowlog: %s", exc)


def task_stack(task: asyncio.Task[Any], loop_thread: int) -> list[str]:
    """The formatted stack of an asyncio task, outermost call first: the chain of coroutines
    it awaits, down to the one suspended (or, when the task runs now, down to the running
    frame of the loop thread)."""
    frames: list[FrameType] = []
    awaited: Any = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is not None:
            frames.append(frame)
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    if frames and _is_running(task):
        # The task blocks the loop: its innermost coroutine's frame is running in the loop
        # thread, and the thread's stack goes on below it (the synchronous calls it made).
        running = sys._current_frames().get(loop_thread)
        below: list[FrameType] = []
        while running is not None and running is not frames[-1]:
            below.append(running)
            running = running.f_back
        if running is not None:
            frames.extend(reversed(below))
    summary = traceback.StackSummary.extract((f, f.f_lineno) for f in frames)
    return summary.format()


def _is_running(task: asyncio.Task[Any]) -> bool:
    """Whether `task` is the one its loop runs now (read from another thread)."""
    import asyncio

    current_tasks = getattr(asyncio.tasks, "_current_tasks", None)
    if not isinstance(current_tasks, dict):
        return False
    return current_tasks.get(task.get_loop()) is task
