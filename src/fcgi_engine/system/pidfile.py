"""Pidfiles: written atomically and never through a symlink; trusted only for our own process.

Trust also depends on who could have written the file. A directory another user can write to
lets that user plant a pidfile (faking a running server), delete ours (so `stop` says "not
running" while the server runs) or squat a socket: such directories are refused, and a pidfile
owned by another user is never believed.
"""

from __future__ import annotations

import os
import stat

from fcgi_engine.config.settings import default_runtime_dir


class PidfileError(Exception):
    pass


class UnsafeDirectory(OSError):
    """A directory other users can write to: files in it cannot be trusted."""


def write_pidfile(path: str, pid: int) -> None:
    """Write `pid` to `path` atomically. A symlink at `path` is refused, never followed."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
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
    return read_pidfile_owner(path)[0]


def read_pidfile_owner(path: str) -> tuple[int | None, int | None]:
    """The pid in `path` and the uid owning the file, read through one descriptor so both
    describe the same file. (None, None) without a file; (None, uid) when it holds no pid."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None, None
    try:
        owner = os.fstat(fd).st_uid
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    first = text.split()[0] if text.split() else ""
    return (int(first) if first.isdigit() and int(first) > 0 else None), owner


def trusted_owner(uid: int) -> bool:
    """Files written by us or by root may be believed; another user's never."""
    return uid in (os.geteuid(), 0)


def describe_uid(uid: int) -> str:
    import pwd

    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def remove_pidfile(path: str, pid: int | None) -> None:
    """Remove `path` only if it still names `pid` (None: only if it is still unreadable)."""
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


def process_uids(pid: int) -> tuple[int, ...] | None:
    """The real, effective, saved and filesystem uids of `pid` (the Uid: line of its status)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return tuple(int(field) for field in line.split()[1:])
    except (OSError, ValueError):
        return None
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_our_master(pid: int, pidfile: str, owner: int | None = None) -> bool:
    """True when `pid` is alive and is an fcgi-engine master for this pidfile.

    A stale pidfile can name a reused pid: its command line must name fcgi-engine and this
    pidfile, or we never signal it. A command line is easy to fake, so the process must also
    belong to whoever wrote the pidfile (`owner`, read from the file when not given), or to root:
    another user's process is never taken for our master.
    """
    if owner is None:
        try:
            owner = os.lstat(pidfile).st_uid
        except OSError:
            return False
    uids = process_uids(pid)
    if not uids or any(uid not in (owner, 0) for uid in uids[:2]):
        return False
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


# ---------------------------------------------------------------- directories


def directory_problem(path: str, *, exclusive: bool = False) -> str | None:
    """Why files in directory `path` could be planted or replaced by another user, or None.

    Every existing directory from / down to `path` is judged (whoever can rename a parent can
    swap the whole subtree): it must belong to us or root, and not be world-writable without
    the sticky bit. In a sticky world-writable directory like /tmp other users can add files
    but not replace ours, so what we find there is judged by its owner. `exclusive` (our own
    runtime directory) also wants `path` itself owned by us and writable by nobody else.
    """
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    current = os.sep
    for part in ["", *parts[1:]]:
        current = os.path.join(current, part) if part else current
        try:
            st = os.stat(current)
        except FileNotFoundError:
            return None  # whoever creates the rest is judged when it exists
        except OSError as exc:
            return f"cannot inspect {current}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"{current} is not a directory"
        shown = current if current == real else f"{current} (a parent of {real})"
        if not trusted_owner(st.st_uid):
            return (
                f"{shown} belongs to {describe_uid(st.st_uid)}, who could plant or replace "
                "files in it"
            )
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            return f"{shown} is writable by every user and not sticky (mode {_mode(st)})"
    if exclusive:
        st = os.stat(real)
        if st.st_uid != os.geteuid():
            return f"{real} belongs to {describe_uid(st.st_uid)}, not to us"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{real} is writable by other users (mode {_mode(st)})"
    return None


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def check_directory(path: str, what: str, *, exclusive: bool = False) -> None:
    """Raise UnsafeDirectory, saying what to do, when `path` is not safe for `what`."""
    problem = directory_problem(path, exclusive=exclusive)
    if problem:
        raise UnsafeDirectory(
            f"refusing the {what} directory: {problem}; use a directory that only root or this "
            "user can write to"
        )


def pidfile_directory(pidfile: str) -> tuple[str, bool]:
    """The pidfile's directory, and whether it is our default runtime directory (which must be
    ours alone: we create it, so one we did not create was planted)."""
    directory = os.path.dirname(os.path.abspath(pidfile))
    return directory, directory == default_runtime_dir()


def ensure_pidfile_directory(pidfile: str) -> None:
    """Create the pidfile's directory (mode 0755) if missing, then refuse it if other users can
    plant or replace files in it (UnsafeDirectory)."""
    directory, exclusive = pidfile_directory(pidfile)
    check_directory(directory, "pidfile", exclusive=exclusive)
    try:
        if not os.path.isdir(directory):
            os.makedirs(directory, mode=0o755, exist_ok=True)
            # Readable by all (status needs the pidfile), whatever the umask; writable by us.
            os.chmod(directory, 0o755)
    except OSError as exc:
        raise UnsafeDirectory(
            f"cannot create the pidfile directory {directory}: {exc.strerror}"
        ) from None
    check_directory(directory, "pidfile", exclusive=exclusive)


def pidfile_directory_problem(pidfile: str) -> str | None:
    """directory_problem for a pidfile's directory, stricter for our default runtime one."""
    directory, exclusive = pidfile_directory(pidfile)
    if exclusive and not os.path.exists(directory):
        exclusive = False  # not created yet: nothing in it to distrust
    return directory_problem(directory, exclusive=exclusive)
