"""`serve --reload`, for development: roll the app out (SIGHUP to the master) when a source file
of it changes.

The master is not touched: before `serve` becomes the master it forks a watcher (`fork_watcher`),
whose parent is the master from then on. The watcher polls the modification times of the app's
files (WATCHED suffixes under one directory, skipping hidden directories, __pycache__,
virtualenvs and site-packages), and on a change, once the files have been quiet for one poll
(an editor saving several files makes one rollout), sends one SIGHUP and prints one line. It
exits as soon as the master is gone (its parent changes), and holds none of the master's sockets
(it is forked before they are opened). A rollout of broken code is rolled back by the master
as any other: the old generation keeps serving, and the next save rolls out again.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator

WATCHED = (".py", ".html", ".txt", ".json")
SKIPPED_DIRS = {"__pycache__", "site-packages", "node_modules"}
MOST_FILES = 20_000  # a directory this large is not an app's source: stop scanning there
POLL_SECONDS = 0.5

Snapshot = dict[str, tuple[int, int]]  # path -> (mtime_ns, size)


def watched_directory(app: str | None, chdir: str | None, cwd: str) -> str:
    """Where the app's source is: the chdir it boots in, else an app file's directory, else the
    directory `serve` runs in (where a module:callable app is imported from)."""
    if chdir:
        return os.path.abspath(chdir)
    spec = (app or "").partition(":")[0]
    if spec.endswith((".py", ".wsgi")) and os.path.isfile(os.path.join(cwd, spec)):
        return os.path.dirname(os.path.abspath(os.path.join(cwd, spec)))
    return os.path.abspath(cwd)


def source_files(root: str) -> Iterator[str]:
    """The files under `root` whose change means new code, at most MOST_FILES of them."""
    count = 0
    for directory, dirs, files in os.walk(root):
        # Pruned in place: os.walk does not descend into what is removed here.
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".")
            and d not in SKIPPED_DIRS
            and not os.path.exists(os.path.join(directory, d, "pyvenv.cfg"))
        ]
        for name in files:
            if name.endswith(WATCHED) and not name.startswith("."):
                yield os.path.join(directory, name)
                count += 1
                if count >= MOST_FILES:
                    return


def snapshot(root: str) -> Snapshot:
    """The modification time and size of every source file under `root`."""
    found: Snapshot = {}
    for path in source_files(root):
        try:
            st = os.stat(path)
        except OSError:
            continue  # removed while we looked: the next poll sees it gone
        found[path] = (st.st_mtime_ns, st.st_size)
    return found


def changed(before: Snapshot, after: Snapshot) -> list[str]:
    """Files added, removed or modified between two snapshots, sorted."""
    return sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


def watch(
    root: str,
    reload: Callable[[list[str]], None],
    alive: Callable[[], bool],
    interval: float = POLL_SECONDS,
) -> None:
    """Poll `root` every `interval` seconds while `alive()`; call `reload(files)` once per burst
    of changes, when a poll finds nothing new since the last one."""
    seen = snapshot(root)
    pending: list[str] = []
    while alive():
        time.sleep(interval)  # a poll, not a wait for a condition: this is the watcher's pace
        now = snapshot(root)
        fresh = changed(seen, now)
        seen = now
        if fresh:
            pending = sorted(set(pending) | set(fresh))
        elif pending:
            reload(pending)
            pending = []


def fork_watcher(root: str, name: str) -> int:
    """Fork the watcher; returns its pid in the parent (which goes on to be the master). The
    child never returns: it watches until its parent is gone, then exits."""
    master = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        # Ctrl-C in the terminal is for the master (which stops, and then so do we); SIGTERM
        # and SIGKILL end us as they would any process.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

        def reload(files: list[str]) -> None:
            shown = ", ".join(os.path.relpath(f, root) for f in files[:3])
            more = f" and {len(files) - 3} more" if len(files) > 3 else ""
            print(
                f"{name}: reload: {shown}{more} changed; rolling out (SIGHUP to master {master})",
                file=sys.stderr,
                flush=True,
            )
            os.kill(master, signal.SIGHUP)

        watch(root, reload, alive=lambda: os.getppid() == master)
    except ProcessLookupError:
        pass  # the master went away between the check and the signal
    except KeyboardInterrupt:
        pass
    except BaseException:  # noqa: BLE001 - a forked child must never return into serve()
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)
