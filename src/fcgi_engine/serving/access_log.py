"""The access log: one line per request the app answered, in the common log format plus the
time taken.

    127.0.0.1 - - [02/Jan/2025:10:00:00 +0000] "GET /path?q=1 HTTP/1.1" 200 1234 0.4ms

The size is what the app's response took on the wire inside FastCGI (headers included); the
status is "-" when the response never started. Each line is one write(2) to a file opened
with O_APPEND, so the lines of every worker sharing the file never interleave.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from fcgi_engine.system.logfile import open_log

log = logging.getLogger("fcgi_engine.worker")


def format_line(environ: dict[str, Any], status: bytes, size: int, took: float, when: str) -> str:
    """One line: `status` is the three digits (b"" if none was sent), `took` in seconds,
    `when` the request's time as strftime("%d/%b/%Y:%H:%M:%S %z")."""
    uri = environ.get("REQUEST_URI") or (
        environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    )
    return (
        f"{environ.get('REMOTE_ADDR', '-')} - - [{when}] "
        f'"{environ.get("REQUEST_METHOD", "-")} {uri} {environ.get("SERVER_PROTOCOL", "-")}" '
        f"{status.decode('latin-1') or '-'} {size} {took * 1000:.1f}ms\n"
    )


class AccessLog:
    """The file at `path`, or the descriptor `fd` already opened for it.

    The generation opens the file as the app's user (so that a failure is reported as the
    rollout's error) and passes the descriptor; a worker on its own opens it here. reopen()
    (on SIGUSR1, after log rotation) opens `path` again and closes the old descriptor.
    """

    def __init__(self, path: str | None, fd: int = -1) -> None:
        self.path = path
        self.fd = fd
        if fd < 0:
            self.reopen()

    @property
    def enabled(self) -> bool:
        return self.fd >= 0

    def reopen(self) -> None:
        """Open the file again; raises OSError when it cannot (the old one stays in use)."""
        if not self.path:
            return
        fd = open_log(self.path)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd

    def write(self, environ: dict[str, Any], status: bytes, size: int, began: float) -> None:
        """Log a request that began at `began` (time.monotonic()) and has just ended."""
        took = time.monotonic() - began
        line = format_line(environ, status, size, took, time.strftime("%d/%b/%Y:%H:%M:%S %z"))
        try:
            os.write(self.fd, line.encode("latin-1", "replace"))
        except OSError as exc:
            log.error("cannot write the access log: %s", exc)
