"""What the master execs to boot a generation: `python -m fcgi_engine.serving NAME`, told what
to boot by the BootSpec in $FCGI_ENGINE_GENERATION; and what the manager runs to check an app:
`python -m fcgi_engine.serving --check SPEC [--log PATH ...]`.

It lowers its CPU priority for the boot where $FCGI_ENGINE_BOOT_NICE asks
(generation.BootPriority, opened before the user switch), switches to the configured user
before any app code is imported, imports the app once (for Python workers), and runs a
Generation composed with the worker kind the server needs.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import traceback

from fcgi_engine import channel
from fcgi_engine.config.boot import ENV_KEY, BootSpec
from fcgi_engine.config.settings import IdentityError, run_as
from fcgi_engine.serving.generation import BootPriority, Generation
from fcgi_engine.serving.kind import WorkerKind
from fcgi_engine.serving.loader import AppLoadError, load_app, resolve_interface
from fcgi_engine.serving.prefork import PythonWorkers, open_access_log
from fcgi_engine.serving.program import ProgramWorkers

log = logging.getLogger("fcgi_engine.generation")

# `--check` exit codes: 5 is LSB's "not installed" (the file or module itself is missing).
CHECK_OK, CHECK_FAILED, CHECK_NOT_FOUND = 0, 1, 5


def check_app(spec: str, logs: list[str], interface: str = "auto") -> int:
    """Open each log for append (as the user the check runs as), import the app and check it
    can be called the way `interface` says."""
    for path in logs:
        try:
            os.close(open_access_log(path))
        except OSError as exc:
            print(f"cannot open log {path}: {exc.strerror or exc}", file=sys.stderr)
            return CHECK_FAILED
    try:
        resolve_interface(load_app(spec), interface, spec)
    except AppLoadError as exc:
        print(exc, file=sys.stderr)
        if exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        text = str(exc).lower()
        missing = text.startswith("no module named") or "does not exist" in text
        return CHECK_NOT_FOUND if missing else CHECK_FAILED
    return CHECK_OK


def drop_privileges(user: str | None, group: str | None) -> None:
    """Become the configured user (as root; otherwise run_as says we already are it)."""
    identity = run_as(user, group)
    if identity is None:
        return
    os.setgroups(list(identity.groups))
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    os.environ["HOME"] = identity.home


def boot(spec: BootSpec, master: socket.socket) -> int:
    def fail(error: str, what: str = "") -> int:
        # The master logs the error it is sent (once, traceback included) and shows it to the
        # caller of the rollout; logging it here too would print it twice in the same log.
        try:
            master.sendall(channel.encode(channel.Failed(error=error)))
        except OSError:
            log.error("%s%s", what, error)
        return 1

    server = spec.server
    # Opened while we may still be root; restored when proven, or half-way to boot_timeout.
    priority = BootPriority.lower()
    priority.restore_after(server.boot_timeout / 2)
    try:
        drop_privileges(server.user, server.group)
    except (IdentityError, KeyError, OSError) as exc:
        return fail(f"cannot switch to user {server.user} / group {server.group}: {exc}")
    kind: WorkerKind
    if spec.command:
        kind = ProgramWorkers(spec)
    else:
        sys.argv = [spec.app, *spec.argv]
        try:
            app = load_app(spec.app)
            interface = resolve_interface(app, server.interface, spec.app)
        except AppLoadError as exc:
            detail = "".join(traceback.format_exception(exc.__cause__)) if exc.__cause__ else ""
            return fail(f"{exc}\n{detail}".rstrip(), "cannot load the app: ")
        try:
            access_fd = open_access_log(server.access_log)
        except OSError as exc:
            return fail(f"cannot open access_log {server.access_log}: {exc.strerror or exc}")
        # What the import built is shared by every worker forked from here: keep the collector
        # from walking (and so copying) those pages in each of them.
        gc.collect()
        gc.freeze()
        kind = PythonWorkers(
            app,
            spec,
            interface=interface,
            access_fd=access_fd,
            after_fork=lambda: generation.close_inherited(),
        )
    generation = Generation(
        server.name,
        spec.generation,
        spec.nproc,
        kind,
        master,
        boot_timeout=server.boot_timeout,
        graceful_timeout=server.graceful_timeout,
        max_memory=server.max_memory,
        priority=priority,
    )
    return generation.run()


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "--check":
        rest = argv[2:]
        options = [(rest[i], rest[i + 1]) for i in range(len(rest) - 1)]
        logs = [value for flag, value in options if flag == "--log"]
        interface = next((value for flag, value in options if flag == "--interface"), "auto")
        return check_app(argv[1], logs, interface)
    spec = BootSpec.from_json(os.environ.pop(ENV_KEY))
    logging.basicConfig(
        level=getattr(logging, spec.server.log_level.upper(), logging.INFO),
        format=f"%(asctime)s [{spec.server.name} gen {spec.generation} %(process)d] "
        "%(levelname)s %(message)s",
        stream=sys.stderr,
    )
    master = socket.socket(fileno=spec.channel_fd)
    master.setblocking(True)
    os.environ["FCGI_ENGINE_GENERATION_ID"] = str(spec.generation)
    return boot(spec, master)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
