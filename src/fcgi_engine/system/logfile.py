"""Log files: opened for append, created rw-r----- (the group may read them, nobody else), and
never inherited by a program we exec.

A log may also be one of the process's standard streams: `-` or `/dev/stdout` is stdout for an
access log or a slowlog, `-` or `/dev/stderr` is stderr for the error log. Those are never
opened by name: /dev/stdout is /proc/self/fd/1, which names whatever fd 1 is *now* (a
generation's fd 1 is the master's output pipe, not the terminal or journal the master writes
to), and opening it fails outright when fd 1 is a socket (systemd's journal). They are
duplicated instead: stdout from $FCGI_ENGINE_STDOUT_FD when the process that spawned us passed
its own stdout there (the master does for its generations), else from fd 1.
"""

from __future__ import annotations

import os

# The descriptor, inherited from the master, of the stdout an access log named `-` goes to.
STDOUT_FD_ENV = "FCGI_ENGINE_STDOUT_FD"
STDOUT_NAMES = ("-", "/dev/stdout")
STDERR_NAMES = ("/dev/stderr",)


def is_stream(path: str) -> bool:
    """`path` names a standard stream (`-`, /dev/stdout, /dev/stderr), not a file to open."""
    return path in STDOUT_NAMES or path in STDERR_NAMES


def stdout_fd() -> int:
    """The descriptor that is our real stdout: the master's when it passed it, else fd 1."""
    inherited = os.environ.get(STDOUT_FD_ENV, "")
    if inherited.isdigit():
        fd = int(inherited)
        try:
            os.fstat(fd)
            return fd
        except OSError:
            pass
    return 1


def open_log(path: str) -> int:
    """A descriptor to append to `path` (`-` and /dev/stdout: stdout, /dev/stderr: stderr);
    OSError says why it cannot be opened. The caller owns (and closes) the descriptor."""
    if path in STDOUT_NAMES:
        return os.dup(stdout_fd())
    if path in STDERR_NAMES:
        return os.dup(2)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)


def redirect_stderr(path: str) -> None:
    """Make `path` this process's stderr (fd 2); OSError leaves the old one in place. `-` and
    /dev/stderr leave stderr as it is; /dev/stdout makes stderr a copy of stdout."""
    if path == "-" or path in STDERR_NAMES:
        return
    fd = os.dup(stdout_fd()) if path == "/dev/stdout" else open_log(path)
    try:
        os.dup2(fd, 2)
    finally:
        os.close(fd)
