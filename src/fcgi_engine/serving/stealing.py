"""Work stealing for the inline worker: while its one thread is inside a long app call, the
requests waiting on its other kept-alive connections go to a worker that can serve them.

A worker with `threads: 1` runs the app inline and reads nothing meanwhile. With the web
server keeping connections alive (nginx `fastcgi_keep_conn on`), a request sent on a
connection this worker holds would wait for the app call to end, while a sibling may be idle
(issue 11 item 6: p99 7.6-9.0 s against 2.0 s with keep-alive off, a 200 ms view, saturated).

The contract with the worker:

- The worker's thread holds `lock` whenever it is not inside an app call, and releases it only
  around the call, having published when the call began (`in_app_since`, 0.0 outside). Holding
  `lock`, the helper thread may therefore change the worker's connection table: the worker's
  thread is in the app (or waiting for `lock` to come back out of it) and touches none of it.
- The helper runs only while `armed` (the worker holds a connection besides the one in the app).
  It wakes about every `after` seconds, and once the call in the app has run `after` seconds it
  calls `steal()` under the lock. `steal` hands every other idle connection with a request
  waiting to the hand-off socket (fcgi_engine.handoff), from which any live worker takes it: an
  idle sibling at once, else the first to be free. Short calls never reach `after`: the hot path
  pays two attribute stores and a lock release and acquire per request, nothing else.

Layer 2 (serving): it knows nothing of connections; the worker's `steal` does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("fcgi_engine.worker")

# An app call running this long makes the requests waiting behind it move to other workers.
# Long enough that a fast app never pays for a hand-off (hello world takes 0.07 ms); short
# against what waiting behind a slow view costs (the 200 ms view of bench/keepalive.py).
STEAL_AFTER = 0.02


class Stealer:
    """The helper thread. `in_app_since` is written by the worker's thread only; `steal` runs
    in the helper thread, under `lock`."""

    def __init__(self, steal: Callable[[], None], after: float = STEAL_AFTER) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()  # the worker's thread holds it from the start
        self.in_app_since = 0.0
        self.after = after
        self.steals = 0  # how many times steal() ran
        self._steal = steal
        self._armed = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None

    @property
    def armed(self) -> bool:
        return self._armed.is_set()

    def arm(self, armed: bool) -> None:
        """Wake the helper (the worker holds connections it could give away) or let it sleep."""
        if armed:
            self._armed.set()
        else:
            self._armed.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="steal", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._armed.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        after = self.after
        while not self._stopped:
            self._armed.wait()
            began = self.in_app_since
            ran = time.monotonic() - began if began else 0.0
            if ran < after:
                # Sleep until the call in the app (or the next one) could have run `after`.
                time.sleep(after - ran)
                continue
            if not self.lock.acquire(blocking=False):
                # The worker's thread is out of the app: it reads its connections itself.
                time.sleep(after)
                continue
            try:
                if self.in_app_since == began and not self._stopped:
                    self.steals += 1
                    self._steal()
            except Exception:  # noqa: BLE001 - a bug here must not stop the worker
                log.exception("handing waiting connections on failed")
            finally:
                self.lock.release()
            time.sleep(after)
