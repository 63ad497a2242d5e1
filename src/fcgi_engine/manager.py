"""The manager: acts on the YAML's servers through pidfiles, signals and the control channel.

Each verb acts on each server independently and returns an Outcome per server; it prints
nothing (the CLI does). Masters are started as separate daemon processes, all at once, so
`start` of many servers takes as long as the slowest.
"""

from __future__ import annotations

import enum
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fcgi_engine import control
from fcgi_engine.config.address import AddressError, UnixAddress, parse_address
from fcgi_engine.config.settings import (
    IdentityError,
    RunAs,
    ServerConfig,
    resolve_allowed_addrs,
    run_as,
)
from fcgi_engine.system import interpreter
from fcgi_engine.system import pidfile as pidfiles
from fcgi_engine.system.logfile import is_stream


class Code(enum.IntEnum):
    """LSB init-script exit codes: the one table (the CLI exits with these). There is no 7
    ("program not running"): no verb needs a running server (graceful starts a stopped one)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_RUNNING_STATUS = 3
    UNKNOWN = 4
    NOT_INSTALLED = 5
    NOT_CONFIGURED = 6


@dataclass
class Outcome:
    name: str
    code: Code
    message: str
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.code == Code.OK


class State(enum.Enum):
    RUNNING = "running"
    STOPPED = "stopped"
    STALE = "stale"  # a pidfile whose process is dead or not ours
    UNKNOWN = "unknown"


@dataclass
class Probe:
    state: State
    pid: int | None = None
    status: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    owner: int | None = None  # the uid owning the pidfile we read


# ---------------------------------------------------------------- how long we wait
#
# Every wait derives from the server's own limits, so a verb neither gives up while the server
# may still do what it was told it may take, nor waits long after the server must have ended.

# On top of each limit, for what the master does between its own deadlines: its loop wakes
# every 0.25 s and acts on a deadline at the next wake-up; at start it probes the socket and
# control paths for a live listener (up to 1 s each). A few seconds on a busy machine.
_MASTER_SLACK = 5.0
# master.policy kills a generation that is still draining 5 s after graceful_timeout.
_DRAIN_BACKSTOP = 5.0
# A fast stop: the generation SIGKILLs its workers 2 s after telling them to quit.
_FAST_STOP = 2.0


def check_timeout(server: ServerConfig) -> float:
    """Importing the app is part of a generation's boot, which boot_timeout bounds."""
    return server.boot_timeout


def answer_timeout(server: ServerConfig) -> float:
    """How long a live master may take to answer on its control socket. Its longest silence is
    a re-exec in place (USR2): an interpreter start, which every generation's boot also makes
    within boot_timeout."""
    return server.boot_timeout + _MASTER_SLACK


def start_timeout(server: ServerConfig) -> float:
    """`start` waits for the master's own start (an interpreter start, within boot_timeout like
    a generation's) and then for its first generation, which the master gives up on after
    boot_timeout and reports."""
    return 2 * server.boot_timeout + _MASTER_SLACK


def stop_timeout(server: ServerConfig, fast: bool) -> float:
    """A graceful stop lets workers finish for graceful_timeout, then the generation kills them
    (and the master kills the generation after its backstop)."""
    drain = _FAST_STOP if fast else server.graceful_timeout + _DRAIN_BACKSTOP
    return drain + _MASTER_SLACK


def rollout_timeout(server: ServerConfig) -> float:
    """The master answers a rollout once the new generation is ready (within boot_timeout) and
    the old one is gone (graceful_timeout, then the master's backstop)."""
    return server.boot_timeout + server.graceful_timeout + _DRAIN_BACKSTOP + _MASTER_SLACK


def probe(server: ServerConfig) -> Probe:
    """What runs for this server, trusting the pidfile only for our own live master.

    A pidfile another user could have planted, deleted or replaced proves nothing either way:
    that is UNKNOWN (with the reason), never "running" nor "not running".
    """
    assert server.pidfile is not None
    pidfile = server.pidfile
    if os.path.islink(pidfile):
        return Probe(
            State.UNKNOWN,
            None,
            error=f"pidfile {pidfile} is a symlink; refusing to read or replace it",
        )
    problem = pidfiles.pidfile_directory_problem(pidfile)
    if problem:
        return Probe(
            State.UNKNOWN,
            error=f"cannot trust the pidfile {pidfile}: {problem}; use a directory that only "
            "root or this user can write to",
        )
    pid, owner = pidfiles.read_pidfile_owner(pidfile)
    if owner is not None and not pidfiles.trusted_owner(owner):
        return Probe(
            State.UNKNOWN,
            error=f"pidfile {pidfile} belongs to {pidfiles.describe_uid(owner)}, not to us or "
            "root: not trusted; remove it if no server of ours runs",
        )
    if pid is None:
        if os.path.lexists(pidfile):
            return Probe(State.STALE, None, error="unreadable pidfile", owner=owner)
        return Probe(State.STOPPED)
    if not pidfiles.pid_alive(pid) or not pidfiles.is_our_master(pid, pidfile, owner):
        return Probe(State.STALE, pid, owner=owner)
    path = server.control_path or ""
    try:
        control_owner: int | None = os.lstat(path).st_uid
    except OSError:
        control_owner = None  # control.call says what is wrong
    if control_owner is not None and control_owner != owner:
        return Probe(
            State.UNKNOWN,
            pid,
            error=f"the control socket {path} belongs to {pidfiles.describe_uid(control_owner)}, "
            f"not to the master's user: not trusted",
            owner=owner,
        )
    try:
        reply = control.ask(path, control.StatusRequest(), timeout=answer_timeout(server))
    except control.ControlError as exc:
        return Probe(
            State.UNKNOWN, pid, error=f"pid {pid} runs but does not answer: {exc}", owner=owner
        )
    if not isinstance(reply, control.StatusResponse):
        return Probe(
            State.UNKNOWN, pid, error=f"pid {pid} refuses its status: {_error(reply)}", owner=owner
        )
    return Probe(State.RUNNING, pid, reply.status, owner=owner)


def _error(reply: control.Response) -> str:
    """What went wrong, as the master said it."""
    if isinstance(reply, (control.ErrorResponse, control.RolloutResponse)):
        return reply.error
    return ""


def _remove_stale_pidfile(server: ServerConfig, pid: int | None) -> None:
    """Remove a pidfile that names a dead or foreign process (never touching that process)."""
    assert server.pidfile is not None
    pidfiles.remove_pidfile(server.pidfile, pid)


# ---------------------------------------------------------------- check


def check(server: ServerConfig, timeout: float | None = None) -> Outcome:
    """Import the app in a throw-away process with the server's environment, user and group,
    within boot_timeout (or `timeout`); for a `command:` server, find the command.

    Whoever can write the release directory decides what the import runs: as root it would run
    as root, so it runs as the server's user, as the app itself will.
    """
    if server.command:
        program = server.command[0]
        from shutil import which

        found = (
            which(program)
            if os.sep not in program
            else (program if os.access(program, os.X_OK) else None)
        )
        if not found:
            return Outcome(server.name, Code.NOT_INSTALLED, f"command not found: {program}")
        return Outcome(server.name, Code.OK, f"ok, command {found}")
    limit = check_timeout(server) if timeout is None else timeout
    try:
        identity = run_as(server.user, server.group)
        resolve_allowed_addrs(server)
    except (IdentityError, AddressError) as exc:
        return Outcome(server.name, Code.FAILURE, f"app check failed: {exc}")
    chdir = os.path.realpath(server.chdir) if server.chdir else None
    if chdir and not os.path.isdir(chdir):
        return Outcome(server.name, Code.NOT_INSTALLED, f"chdir {server.chdir} does not exist")
    env = interpreter.with_package_path({**os.environ, **server.environment})
    python = interpreter.python(server.python)
    argv = [python, "-m", "fcgi_engine.serving", "--check", server.app_spec or ""]
    argv += ["--interface", server.interface]
    for log_path in (server.access_log, server.error_log):
        if log_path and not is_stream(log_path):
            # Opened for append (created) by the check as the server's user, as the server will.
            argv += ["--log", log_path]
    as_user = f" as user {identity.user}" if identity else ""
    try:
        code, text = _run_check(argv, cwd=chdir, env=env, identity=identity, limit=limit)
    except FileNotFoundError:
        return Outcome(server.name, Code.NOT_INSTALLED, f"python not found: {python}")
    except PermissionError as exc:
        hint = (
            f"; set python: to an interpreter (or virtualenv) user {identity.user} may read and run"
            if identity
            else ""
        )
        return Outcome(
            server.name,
            Code.FAILURE,
            f"app check failed: cannot run {python}{as_user}: {exc.strerror}{hint}",
        )
    except OSError as exc:
        return Outcome(
            server.name,
            Code.FAILURE,
            f"app check failed: cannot start {python}{as_user}: {exc.strerror or exc}",
        )
    if code is None:
        return Outcome(
            server.name,
            Code.FAILURE,
            f"app check failed: importing the app took over {limit:g} s (boot_timeout)",
            detail=text.strip(),
        )
    if code == 0:
        return Outcome(server.name, Code.OK, f"ok, {server.app_spec} imports{as_user}")
    text = text.strip()
    first = text.splitlines()[0] if text else f"exit status {code}"
    outcome_code = Code.NOT_INSTALLED if code == 5 else Code.FAILURE
    return Outcome(server.name, outcome_code, f"app check failed: {first}", detail=text)


def _run_check(
    argv: list[str], *, cwd: str | None, env: dict[str, str], identity: RunAs | None, limit: float
) -> tuple[int | None, str]:
    """Run the check; its exit status (None when it outlived `limit`) and its output."""
    switch: dict[str, Any] = {}
    if identity is not None:
        # What the generation does before it imports the app: initgroups, setgid, setuid, HOME.
        env = dict(env, HOME=identity.home)
        switch = {
            "user": identity.uid,
            "group": identity.gid,
            "extra_groups": list(identity.groups),
        }
    with subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        encoding="utf-8",
        errors="replace",  # an app may print anything while it imports
        # Its own session, so a hung import and anything it forked are killed together.
        start_new_session=True,
        **switch,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                # What it printed before it hung; a helper that left the session and still
                # holds the pipes is not waited for.
                out, err = proc.communicate(timeout=1.0)
            except subprocess.TimeoutExpired:
                out, err = "", ""
            return None, (out or "") + (err or "")
    return proc.returncode, (out or "") + (err or "")


# ---------------------------------------------------------------- start


@dataclass
class _Launch:
    server: ServerConfig
    proc: subprocess.Popen[str] | None
    outcome: Outcome | None = None
    note: str = ""
    unready: bool = False  # start --wait-ready: started, waiting until it reports ready


def master_command(config_path: str, server: ServerConfig) -> list[str]:
    """The master's command line: it names the pidfile, which is how we recognise it later."""
    assert server.pidfile is not None
    return [
        sys.executable,
        "-m",
        "fcgi_engine",
        "-c",
        os.path.abspath(config_path),
        "master",
        server.name,
        "--pidfile",
        os.path.abspath(server.pidfile),
    ]


def start(
    config_path: str,
    servers: Sequence[ServerConfig],
    progress: Callable[[str], None] | None = None,
    *,
    wait_ready: bool = False,
    wait_timeout: float | None = None,
) -> list[Outcome]:
    """Start every server that is not running, in parallel; wait until each is ready or failed.

    With `wait_ready`, a server counts as started only once its master reports it ready (an
    active generation proven, no stop or drain running), which also waits out a running server
    that is still booting or draining. `wait_timeout` bounds that wait, counted from the call
    (checks included): a server not ready by then fails with the reason, and is left to go on
    starting (it is not killed: the master itself gives up after boot_timeout).
    """
    begun = time.monotonic()
    # Checks (a throw-away import each) and boots run side by side: as slow as the slowest.
    launches = _in_parallel(lambda server: _begin_start(config_path, server), servers)
    for launch in launches:
        # One already running must be ready too (it may be booting, or draining to stop).
        launch.unready = (
            wait_ready and launch.proc is None and bool(launch.outcome and launch.outcome.ok)
        )
    started_at = time.monotonic()
    last_progress = started_at

    def waiting() -> list[_Launch]:
        return [launch for launch in launches if launch.outcome is None or launch.unready]

    while waiting():
        for launch in waiting():
            now = time.monotonic()
            if wait_timeout is not None:
                late = now - begun > wait_timeout
            else:
                late = now - started_at > start_timeout(launch.server)
            if launch.outcome is None and launch.proc is not None:
                if launch.proc.poll() is not None:
                    launch.outcome = _finish_start(launch)
                    launch.unready = wait_ready and launch.outcome.ok
                elif wait_timeout is not None and late:
                    # Still booting its first generation: not ready in time, but started.
                    launch.outcome = Outcome(
                        launch.server.name,
                        Code.FAILURE,
                        f"not ready within {wait_timeout:g} s: its first generation is still "
                        "booting (the server goes on starting)",
                    )
                elif now - started_at > start_timeout(launch.server):
                    launch.proc.kill()
                    launch.outcome = Outcome(
                        launch.server.name,
                        Code.FAILURE,
                        f"failed to start: no answer from the master within "
                        f"{start_timeout(launch.server):g} s",
                    )
            elif launch.unready and launch.outcome is not None:
                launch.outcome, launch.unready = _await_ready(launch.server, launch.outcome, late)
        now = time.monotonic()
        if progress and now - last_progress >= 1.0:
            names = [launch.server.name for launch in waiting()]
            if names:
                progress(f"waiting for {', '.join(names)} ({now - started_at:.0f} s)")
            last_progress = now
        time.sleep(0.02)
    return [launch.outcome for launch in launches if launch.outcome is not None]


def _await_ready(server: ServerConfig, started: Outcome, late: bool) -> tuple[Outcome, bool]:
    """One look at a started server for `start --wait-ready`: (its outcome, still waiting). Past
    the deadline (`late`), a server that is not ready fails with the reason."""
    state = probe(server)
    if state.state is State.RUNNING:
        ready = readiness(state.status)
        data = {
            **started.data,
            **state.status,
            "ready": ready.ready,
            "ready_reason": ready.reason or None,
        }
        if ready.ready:
            return Outcome(server.name, Code.OK, f"{started.message}, ready", data=data), False
        if not late:
            return started, True
        return Outcome(
            server.name,
            Code.FAILURE,
            f"{started.message}, but not ready: {ready.reason}",
            data=data,
        ), False
    if not late and state.state is State.UNKNOWN:
        return started, True  # e.g. busy re-executing itself: ask again
    why = "it stopped" if state.state in (State.STOPPED, State.STALE) else state.error
    return Outcome(
        server.name, Code.FAILURE, f"{started.message}, but never ready: {why}", data=started.data
    ), False


def _begin_start(config_path: str, server: ServerConfig) -> _Launch:
    state = probe(server)
    note = ""
    if state.state is State.RUNNING:
        gen = state.status.get("generation")
        return _Launch(
            server,
            None,
            Outcome(
                server.name,
                Code.OK,
                f"already running (pid {state.pid}, generation {gen})",
                data=state.status,
            ),
        )
    if state.state is State.UNKNOWN:
        return _Launch(
            server,
            None,
            Outcome(
                server.name,
                Code.FAILURE,
                state.error,
            ),
        )
    if state.state is State.STALE:
        _remove_stale_pidfile(server, state.pid)
        note = f"stale pidfile removed (pid {state.pid}); "
    try:
        _check_directories(server)
    except pidfiles.UnsafeDirectory as exc:
        return _Launch(server, None, Outcome(server.name, Code.FAILURE, f"{note}{exc}"))
    checked = check(server)
    if not checked.ok:
        checked.message = note + checked.message
        return _Launch(server, None, checked)
    proc = subprocess.Popen(
        master_command(config_path, server) + ["--daemon"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return _Launch(server, proc, note=note)


def _check_directories(server: ServerConfig) -> None:
    """Refuse (UnsafeDirectory) a pidfile or socket directory where another user could plant,
    delete or replace our files; creates the pidfile's directory when it is missing. The master
    checks again; this only says so before a slow import."""
    assert server.pidfile is not None
    pidfiles.ensure_pidfile_directory(server.pidfile)
    try:
        address = parse_address(server.socket)
    except AddressError:
        return  # the master reports it
    if isinstance(address, UnixAddress):
        pidfiles.check_directory(os.path.dirname(os.path.abspath(address.path)), "socket")


def _finish_start(launch: _Launch) -> Outcome:
    assert launch.proc is not None
    out, err = launch.proc.communicate()
    name = launch.server.name
    if launch.proc.returncode == 0:
        state = probe(launch.server)
        workers = len(state.status.get("workers", []))
        return Outcome(
            name,
            Code.OK,
            f"{launch.note}started (pid {state.pid}, generation "
            f"{state.status.get('generation')}, {workers} workers)",
            data=state.status,
        )
    reason = (err or out).strip().splitlines()
    text = reason[-1] if reason else "the master exited"
    text = text.split(": failed to start: ", 1)[-1]
    return Outcome(
        name, Code.FAILURE, f"{launch.note}failed to start: {text}", detail=(err or out).strip()
    )


# ---------------------------------------------------------------- stop


def stop(servers: Sequence[ServerConfig], fast: bool = False) -> list[Outcome]:
    """Stop every server, all at once: as slow as the slowest."""
    return _in_parallel(lambda server: _stop_one(server, fast), servers, at_once=len(servers))


def _stop_one(server: ServerConfig, fast: bool) -> Outcome:
    """Ask the master to stop (it answers once its generations are gone); only a master that
    does not answer is signalled, and one still there after stop_timeout is killed."""
    state = probe(server)
    if state.state is State.STOPPED:
        return Outcome(server.name, Code.OK, "not running")
    if state.state is State.STALE:
        _remove_stale_pidfile(server, state.pid)
        return Outcome(
            server.name, Code.OK, f"not running (stale pidfile removed, pid {state.pid})"
        )
    if state.pid is None:
        # Nothing we trust names a process: signalling anything would be a guess.
        return Outcome(server.name, Code.FAILURE, f"cannot tell whether it runs: {state.error}")
    pid, limit = state.pid, stop_timeout(server, fast)
    since = time.monotonic()
    deadline = since + limit

    def ours() -> bool:
        return pidfiles.pid_alive(pid) and pidfiles.is_our_master(
            pid, server.pidfile or "", state.owner
        )

    answered = False
    if state.state is State.RUNNING:
        try:
            reply = control.ask(server.control_path or "", control.StopRequest(fast), limit)
            answered = isinstance(reply, control.StoppedResponse)
        except control.ControlError:
            pass  # gone quiet: signals below
    if not answered and time.monotonic() < deadline:
        # Our own master that does not answer (or stopped answering): it is ours to signal.
        try:
            os.kill(pid, signal.SIGQUIT if fast else signal.SIGTERM)
        except ProcessLookupError:
            pass
    # Once it answered it only removes its files and exits.
    while time.monotonic() < deadline and ours():
        time.sleep(0.02)
    if ours():
        os.kill(pid, signal.SIGKILL)
        return Outcome(
            server.name, Code.FAILURE, f"did not stop within {limit:g} s; killed pid {pid}"
        )
    took = time.monotonic() - since
    return Outcome(server.name, Code.OK, f"stopped (pid {pid}, {took:.1f} s)")


# ---------------------------------------------------------------- restart


def restart(
    config_path: str, servers: Sequence[ServerConfig], progress: Callable[[str], None] | None = None
) -> list[Outcome]:
    """Stop, then start (with downtime). A server whose app does not pass `check` is not
    stopped at all: a broken release never takes a running server down."""
    checks = dict(zip([s.name for s in servers], _in_parallel(check, servers), strict=True))
    ready = [s for s in servers if checks[s.name].ok]
    stopped = {o.name: o for o in stop(ready)}
    to_start = [s for s in ready if stopped[s.name].ok]
    started = {o.name: o for o in start(config_path, to_start, progress)}
    outcomes = []
    for server in servers:
        checked = checks[server.name]
        if not checked.ok:
            outcomes.append(
                Outcome(
                    server.name,
                    checked.code,
                    f"restart refused, nothing changed: {checked.message}",
                    detail=checked.detail,
                )
            )
        else:
            outcomes.append(started.get(server.name) or stopped[server.name])
    return outcomes


# ---------------------------------------------------------------- graceful


def graceful(
    config_path: str, servers: Sequence[ServerConfig], progress: Callable[[str], None] | None = None
) -> list[Outcome]:
    """Roll each running server out (each independently, all at once); start the stopped ones.
    Every Outcome's data carries the rollout fields (`rollout_fields`): the `graceful --json`
    contract."""
    results = _in_parallel(_graceful_one, servers)
    to_start = [s for s, r in zip(servers, results, strict=True) if r is None]
    outcomes = {r.name: r for r in results if r is not None}
    for outcome in start(config_path, to_start, progress):
        outcome.message = "was not running; " + outcome.message
        generation = outcome.data.get("generation") if outcome.ok else None
        outcome.data = {
            **outcome.data,
            **rollout_fields(
                outcome.name,
                ok=outcome.ok,
                new_generation=generation if isinstance(generation, int) else None,
                error=None if outcome.ok else (outcome.detail or outcome.message),
            ),
        }
        outcomes[outcome.name] = outcome
    return [outcomes[s.name] for s in servers]


def rollout_fields(
    server: str,
    *,
    ok: bool,
    old_generation: int | None = None,
    new_generation: int | None = None,
    release_dir: str | None = None,
    boot_seconds: float | None = None,
    health: dict[str, Any] | None = None,
    rolled_back: bool = False,
    error: str | None = None,
) -> dict[str, Any]:
    """The fields `graceful --json` promises for each server (README, "Several hosts"): every
    key always present, null where unknown."""
    return {
        "server": server,
        "ok": ok,
        "old_generation": old_generation,
        "new_generation": new_generation,
        "release_dir": release_dir,
        "boot_seconds": boot_seconds,
        "health": health,
        "rolled_back": rolled_back,
        "error": error,
    }


def _graceful_one(server: ServerConfig) -> Outcome | None:
    """Roll one running server out; None when it is not running (graceful then starts it)."""
    state = probe(server)
    if state.state in (State.STOPPED, State.STALE):
        return None
    old = state.status.get("generation")
    old_generation = old if isinstance(old, int) and not isinstance(old, bool) else None
    if state.state is State.UNKNOWN:
        return Outcome(
            server.name,
            Code.FAILURE,
            state.error,
            data=rollout_fields(server.name, ok=False, error=state.error),
        )
    checked = check(server)
    if not checked.ok:
        # Nothing was started: the old generation serves on, untouched.
        return Outcome(
            server.name,
            checked.code,
            f"graceful refused, nothing changed: {checked.message}",
            detail=checked.detail,
            data=rollout_fields(
                server.name,
                ok=False,
                old_generation=old_generation,
                health=_health_field(server, None),
                error=checked.detail or checked.message,
            ),
        )
    return _rollout(server, old_generation)


def _health_field(server: ServerConfig, said: Any) -> dict[str, Any] | None:
    """The rollout's health result: what the master said ({"path", "status"}), else the
    configured path with an unknown status; null when there is no health check."""
    if isinstance(said, dict) and isinstance(said.get("path"), str):
        status = said.get("status")
        return {"path": said["path"], "status": status if isinstance(status, int) else None}
    if said is None and not server.health:
        return None
    return {"path": server.health, "status": None} if server.health else None


T = TypeVar("T")


def _in_parallel(
    work: Callable[[ServerConfig], T], servers: Sequence[ServerConfig], at_once: int = 16
) -> list[T]:
    """`work` on each server in threads, `at_once` at most (work that starts processes, such as
    checks, keeps the default; work that only waits can take them all)."""
    if len(servers) <= 1:
        return [work(s) for s in servers]
    with ThreadPoolExecutor(max_workers=min(at_once, len(servers))) as pool:
        return list(pool.map(work, servers))


def _rollout(server: ServerConfig, old_generation: int | None) -> Outcome:
    started = time.monotonic()
    try:
        reply = control.ask(
            server.control_path or "", control.RolloutRequest(), timeout=rollout_timeout(server)
        )
    except control.ControlError as exc:
        return Outcome(
            server.name,
            Code.FAILURE,
            f"graceful failed: {exc}",
            data=rollout_fields(
                server.name,
                ok=False,
                old_generation=old_generation,
                health=_health_field(server, None),
                error=str(exc),
            ),
        )
    took = time.monotonic() - started
    # The wire's own keys ("from", "to", "workers", "seconds"...) stay as they always were;
    # the contract's fields are added beside them.
    data = control.response_wire(reply)
    if isinstance(reply, control.RolloutResponse):
        # Fields a master older than the contract does not send are null.
        release_dir = getattr(reply, "release_dir", None)
        fields = rollout_fields(
            server.name,
            ok=reply.ok,
            old_generation=reply.from_gen if reply.from_gen is not None else old_generation,
            new_generation=reply.to_gen,
            release_dir=release_dir if isinstance(release_dir, str) else None,
            boot_seconds=reply.boot_seconds,
            health=_health_field(server, getattr(reply, "health", None)),
            rolled_back=reply.rolled_back,
            error=None if reply.ok else (reply.error or "unknown error"),
        )
    else:
        fields = rollout_fields(
            server.name,
            ok=False,
            old_generation=old_generation,
            health=_health_field(server, None),
            error=_error(reply) or "unknown error",
        )
    data.update(fields)
    if isinstance(reply, control.RolloutResponse) and reply.ok:
        return Outcome(
            server.name,
            Code.OK,
            f"graceful ok, generation {reply.from_gen} -> {reply.to_gen}, "
            f"{reply.workers} workers, {took:.1f} s",
            data=data,
        )
    error = _error(reply) or "unknown error"
    first = error.strip().splitlines()[0] if error.strip() else error
    rolled_back = isinstance(reply, control.RolloutResponse) and reply.rolled_back
    what = "rolled back, old generation still serving" if rolled_back else "failed"
    return Outcome(server.name, Code.FAILURE, f"graceful {what}: {first}", detail=error, data=data)


# ---------------------------------------------------------------- status


def server_for_pidfile(pidfile: str) -> ServerConfig:
    """A stand-in for a server known only by its pidfile (`serve --pidfile F`, no YAML): enough
    to probe it. Its control socket is beside the pidfile, as `serve` puts it; it answers
    within the default boot_timeout's bound."""
    path = os.path.abspath(pidfile)
    return ServerConfig(name=path, socket="fd:0", pidfile=path, app="-")


def status(servers: Sequence[ServerConfig]) -> list[Outcome]:
    """One Outcome per server: running (with its snapshot in `data`), stopped, dead or unknown."""
    return [status_of(server, probe(server)) for server in servers]


def status_of(server: ServerConfig, state: Probe) -> Outcome:
    """The status Outcome of one probed server. A server known by its pidfile alone is named
    as its master names itself."""
    if server.app == "-" and state.status.get("name"):
        server = ServerConfig(
            name=str(state.status["name"]), socket=server.socket, pidfile=server.pidfile, app="-"
        )
    if state.state is State.STOPPED:
        return Outcome(
            server.name, Code.NOT_RUNNING_STATUS, "not running", data={"state": "stopped"}
        )
    if state.state is State.STALE:
        return Outcome(
            server.name,
            Code.FAILURE,
            f"not running, but a stale pidfile names pid {state.pid}",
            data={"state": "dead", "pid": state.pid},
        )
    if state.state is State.UNKNOWN:
        return Outcome(
            server.name,
            Code.UNKNOWN,
            f"cannot tell: {state.error}",
            data={"state": "unknown", "pid": state.pid},
        )
    st = state.status
    workers = st.get("workers", [])
    busy = sum(1 for w in workers if w.get("state") == "busy")
    return Outcome(
        server.name,
        Code.OK,
        f"running, pid {state.pid}, generation {st.get('generation')}, workers "
        f"{len(workers)}/{st.get('nproc')} ({busy} busy), "
        f"up {duration_text(st.get('uptime', 0))}, {requests_total(st)} requests"
        + "".join(", " + part for part in load_summary(st)),
        data={**st, "state": "running", "pid": state.pid},  # the pid the pidfile proved
    )


@dataclass(frozen=True)
class Readiness:
    """Whether a running server takes requests as an orchestrator means it, and why not."""

    ready: bool
    reason: str = ""  # "" when ready


def readiness(status: dict[str, Any]) -> Readiness:
    """Readiness from a master's status snapshot: its "ready" (true only while an active
    generation has passed its proof and no stop or drain runs). A master older than "ready" is
    judged by its state: running with an active generation."""
    stopping = status.get("state") == "stopping"
    ready = status.get("ready")
    if not isinstance(ready, bool):
        ready = not stopping and status.get("state") == "running" and bool(status.get("generation"))
    if ready:
        return Readiness(True)
    for key in ("ready_reason", "not_ready_reason", "reason"):
        said = status.get(key)
        if isinstance(said, str) and said:
            return Readiness(False, said)
    if stopping:
        until = status.get("drain_delay_until") or status.get("stopping_at")
        return Readiness(
            False, f"stopping (draining until {_clock(until)})" if until else "stopping"
        )
    if not status.get("generation"):
        booting = status.get("booting")
        return Readiness(
            False, f"starting, generation {booting} booting" if booting else "no generation serves"
        )
    return Readiness(False, "the master says not ready")


def _clock(wall: Any) -> str:
    """A wall-clock time (seconds since the epoch) as the local time of day; other values as
    they are."""
    if isinstance(wall, (int, float)) and not isinstance(wall, bool):
        return time.strftime("%H:%M:%S", time.localtime(wall))
    return str(wall)


def status_ready(servers: Sequence[ServerConfig]) -> list[Outcome]:
    """`status --ready`: one Outcome per server, code 0 ready, 1 running but not ready,
    3 not running, 4 cannot tell."""
    return [ready_of(server, probe(server)) for server in servers]


def ready_of(server: ServerConfig, state: Probe) -> Outcome:
    """The `status --ready` Outcome of one probed server (its status Outcome, judged by
    readiness)."""
    outcome = status_of(server, state)
    if state.state in (State.STOPPED, State.STALE):
        # For an exec probe a dead master and no master are the same: not running.
        return Outcome(
            outcome.name,
            Code.NOT_RUNNING_STATUS,
            f"not ready: {outcome.message}",
            data={**outcome.data, "ready": False, "ready_reason": "not running"},
        )
    if state.state is not State.RUNNING:
        return Outcome(outcome.name, outcome.code, outcome.message, data=outcome.data)
    ready = readiness(state.status)
    data = {**outcome.data, "ready": ready.ready, "ready_reason": ready.reason or None}
    if ready.ready:
        return Outcome(
            outcome.name, Code.OK, f"ready, generation {state.status.get('generation')}", data=data
        )
    return Outcome(outcome.name, Code.FAILURE, f"not ready: {ready.reason}", data=data)


# A snapshot's "metrics" come from a master of this version; an older master sends none, or
# some of them: every reader below shows what exists and skips the rest.


def metrics_of(status: dict[str, Any]) -> dict[str, Any]:
    metrics = status.get("metrics")
    return metrics if isinstance(metrics, dict) else {}


def requests_by_class(status: dict[str, Any]) -> dict[str, int]:
    """Requests answered, by status class ("2xx"...; "none": no status, e.g. the peer left),
    the classes with none left out."""
    counts = metrics_of(status).get("requests")
    if not isinstance(counts, dict):
        return {}
    return {k: v for k, v in counts.items() if isinstance(v, int) and v}


def requests_total(status: dict[str, Any]) -> int:
    """Requests since the master started (every generation), as `top` and the status page
    count them; from an older master, its active generation's."""
    classes = requests_by_class(status)
    return sum(classes.values()) if classes else int(status.get("requests", 0))


def listen_queue_text(status: dict[str, Any]) -> str:
    """`queue 3 (max 18, limit 128)`: connections waiting in the kernel's listen queue now, the
    most it held, and the backlog past which the kernel refuses them (each part only when the
    master measures it); "" when it does not."""
    queue = metrics_of(status).get("listen_queue")
    if not isinstance(queue, dict) or queue.get("now") is None:
        return ""
    more = [f"{k} {queue[k]}" for k in ("max", "limit") if queue.get(k) is not None]
    return f"queue {queue['now']}" + (f" ({', '.join(more)})" if more else "")


def load_summary(status: dict[str, Any]) -> list[str]:
    """The parts of the status line that tell saturation: queue, rate, in flight, classes."""
    metrics = metrics_of(status)
    parts = []
    queue = listen_queue_text(status)
    if queue:
        parts.append(queue)
    rate = metrics.get("requests_per_second")
    if isinstance(rate, (int, float)):
        parts.append(f"{rate:.1f} req/s")
    if isinstance(metrics.get("in_flight"), int):
        parts.append(f"{metrics['in_flight']} in flight")
    classes = requests_by_class(status)
    if classes:
        parts.append(" ".join(f"{k} {v}" for k, v in classes.items()))
    return parts


def duration_text(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
