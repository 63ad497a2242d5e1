"""Pidfiles: written atomically and never through a symlink; trusted only for our own process."""

from __future__ import annotations

import os


class PidfileError(Exception):
    pass


def write_pidfile(path: str, pid: int) -> None:
    """Write `pid` to `path` atomically. A symlink at `path` is refused, never followed."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        import stat

        if stat.S_ISLNK(st.st_mode):
            raise PidfileError(f"{path} is a symlink; refusing to write a pidfile through it")
    temp = os.path.join(directory, f".{os.path.basename(path)}.{pid}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        os.unlink(temp)
    except FileNotFoundError:
        pass
    fd = os.open(temp, flags, 0o644)
    try:
        os.write(fd, f"{pid}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temp, path)


def read_pidfile(path: str) -> int | None:
    """The pid in `path`, or None when there is no usable pidfile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    first = text.split()[0] if text.split() else ""
    return int(first) if first.isdigit() and int(first) > 0 else None


def remove_pidfile(path: str, pid: int) -> None:
    """Remove `path` only if it still names `pid`."""
    if read_pidfile(path) == pid:
        try:
            os.unlink(path)
        except OSError:
            pass


def process_cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_our_master(pid: int, pidfile: str) -> bool:
    """True when `pid` is alive and is an fcgi-engine master for this pidfile.

    A stale pidfile can name a reused pid: its command line must name fcgi-engine and this
    pidfile, or we never signal it.
    """
    cmd = process_cmdline(pid)
    if not cmd:
        return False
    joined = " ".join(cmd)
    if "fcgi_engine" not in joined and "fcgi-engine" not in joined:
        return False
    wanted = os.path.abspath(pidfile)
    if wanted in cmd:
        return True
    # `serve --pidfile app.pid` typed by hand names it relative to that process's directory.
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    for flag, value in zip(cmd, cmd[1:], strict=False):
        if flag in ("--pidfile", "-p") and os.path.normpath(os.path.join(cwd, value)) == wanted:
            return True
    return any(
        arg.startswith("--pidfile=") and os.path.normpath(os.path.join(cwd, arg[10:])) == wanted
        for arg in cmd
    )
