"""Complaints that repeat while a shortage lasts (out of descriptors, a refused peer, a flood
of control connections): one log line per kind per interval, and the occurrences in between
counted, not lost."""

from __future__ import annotations

import logging

INTERVAL = 10.0


class RateLimitedLog:
    """One line per key per interval; `flush` reports what was held back once its interval is
    over, even if it does not recur."""

    def __init__(self, logger: logging.Logger, interval: float = INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self.last: dict[str, float] = {}
        self.pending: dict[str, tuple[int, str, int]] = {}

    def __call__(self, key: str, message: str, now: float, level: int = logging.ERROR) -> None:
        last = self.last.get(key)
        if last is not None and now - last < self.interval:
            count, _, _ = self.pending.get(key, (0, "", level))
            self.pending[key] = (count + 1, message, level)
            return
        self.last[key] = now
        self.logger.log(level, "%s", message)

    def flush(self, now: float) -> None:
        for key, (count, message, level) in list(self.pending.items()):
            if now - self.last.get(key, 0.0) >= self.interval:
                del self.pending[key]
                self.last[key] = now
                self.logger.log(
                    level,
                    "%s (%d more time%s in the last %g s)",
                    message,
                    count,
                    "" if count == 1 else "s",
                    self.interval,
                )
