"""Log files: opened for append, created rw-r----- (the group may read them, nobody else), and
never inherited by a program we exec."""

from __future__ import annotations

import os


def open_log(path: str) -> int:
    """A descriptor to append to `path`; OSError says why it cannot be opened."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)


def redirect_stderr(path: str) -> None:
    """Make `path` this process's stderr (fd 2); OSError leaves the old one in place."""
    fd = open_log(path)
    try:
        os.dup2(fd, 2)
    finally:
        os.close(fd)
