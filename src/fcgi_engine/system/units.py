"""systemd units for fcgi-engine servers, rendered for this installation, printed or installed.

Contract:
- Every unit runs the fcgi-engine of the interpreter running this code (`engine_command`): the
  console script beside sys.executable when there is one (a virtualenv's bin/fcgi-engine), else
  `sys.executable -m fcgi_engine`; never a guessed /usr/local/bin.
- `for_app` renders one `serve` server as fcgi-engine-NAME.service (Type=notify: READY=1 comes
  once the first generation has proven itself) and fcgi-engine-NAME.socket (socket activation:
  systemd holds the listening socket, so even a restart of the service refuses no connection).
- `for_config` renders the template fcgi-engine@.service: instance NAME runs the YAML's server
  NAME in the foreground (`fcgi-engine -c CONFIG run NAME`), with the settings `start` uses.
- Both stop with SIGTERM to the master only (KillMode=mixed): the master drains its generations
  within graceful_timeout, which TimeoutStopSec covers; `systemctl reload` is a HUP, a rollout.
- `install` writes units atomically, never through a symlink (a symlinked unit file is usually a
  masked unit: refused, not replaced), into a directory only root or we can write.
Errors are UnitError, saying what to change.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fcgi_engine.config.address import AddressError, TcpAddress, UnixAddress, parse_address
from fcgi_engine.config.settings import SETTINGS, ServerConfig
from fcgi_engine.system import pidfile as pidfiles

DEFAULT_DIR = "/etc/systemd/system"
# Characters a unit name (and an instance of the template) may hold as they are; others would
# need systemd-escape, and %i would hand the master the escaped form, not the server's name.
_UNIT_NAME_CHARS = re.compile(r"[A-Za-z0-9:_.\-]+")
# Arguments that need no quotes on an Exec line.
_PLAIN_ARG = re.compile(r"[A-Za-z0-9_@+=:,./\-]+")
# On top of boot_timeout: the master's own interpreter start and its socket probes (up to a
# second each), on a busy machine.
_START_SLACK = 15
# On top of graceful_timeout: the master kills a generation still draining 5 s after it
# (master.policy.DRAIN_BACKSTOP), then reaps it and exits; a few seconds more on a busy machine.
_STOP_SLACK = 15
# Each worker holds up to worker_connections sockets (1000 by default), beyond the 1024 that
# systemd gives a service as its soft limit.
_NOFILE = 65536


class UnitError(Exception):
    """Units cannot be rendered or installed as asked; the message says what to change."""


@dataclass(frozen=True)
class Unit:
    filename: str
    text: str


@dataclass(frozen=True)
class Rendered:
    units: tuple[Unit, ...]
    enable: tuple[str, ...]  # what `systemctl enable --now` takes once they are installed

    def next_steps(self) -> str:
        return f"systemctl daemon-reload && systemctl enable --now {' '.join(self.enable)}"


def engine_command() -> list[str]:
    """This installation's fcgi-engine as an absolute command line.

    sys.executable is kept as it is spelled, not resolved: a virtualenv's bin/python is a symlink
    whose location is what makes it the virtualenv's.
    """
    python = os.path.abspath(sys.executable)
    script = os.path.join(os.path.dirname(python), "fcgi-engine")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [script]
    return [python, "-m", "fcgi_engine"]


def exec_quote(arg: str) -> str:
    """`arg` as one word of an Exec= line: quoted when needed, $ and % kept literal."""
    if "\n" in arg or "\0" in arg:
        raise UnitError(f"{arg!r}: a systemd command line cannot hold a newline or NUL")
    # % starts a specifier and $ a variable, quoted or not: doubled, they are themselves.
    text = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN_ARG.fullmatch(arg):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_line(argv: Sequence[str]) -> str:
    return " ".join(exec_quote(a) for a in argv)


def _seconds(value: float) -> str:
    return f"{max(1, round(value))}s"


def unit_name_for(name: str) -> str:
    """The unit-name part for a server called `name` (`myapp:app` -> myapp)."""
    stem = name.split("(", 1)[0].split(":", 1)[0].rstrip("/")
    stem = os.path.basename(stem)
    for suffix in (".py", ".wsgi"):
        stem = stem.removesuffix(suffix)
    stem = re.sub(r"[^A-Za-z0-9_.\-]+", "-", stem).strip("-.")
    if not stem:
        raise UnitError(f"cannot name a unit after {name!r}: give --name NAME")
    return stem


def listen_stream(socket_setting: str) -> str:
    """A ListenStream= value for the `socket` setting (a unix path or an IP address and port)."""
    try:
        address = parse_address(socket_setting)
    except AddressError as exc:
        raise UnitError(f"--listen {socket_setting}: {exc}") from None
    if isinstance(address, UnixAddress):
        return os.path.abspath(address.path)
    assert isinstance(address, TcpAddress)
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        raise UnitError(
            f"--listen {socket_setting}: systemd listens on IP addresses, not host names: "
            "write the address (127.0.0.1:9000)"
        ) from None
    return f"[{ip}]:{address.port}" if ip.version == 6 else f"{ip}:{address.port}"


# ---------------------------------------------------------------- one `serve` server


def for_app(
    cfg: ServerConfig,
    given: Mapping[str, Any],
    *,
    socket_group: str = "www-data",
    working_directory: str | None = None,
) -> Rendered:
    """The service and socket units of `fcgi-engine serve` with the settings in `given` (the
    parsed `serve` arguments: key -> value as typed, None when not given); `cfg` is the same,
    checked. The socket and its mode go to the .socket unit; the rest to ExecStart."""
    name = unit_name_for(cfg.name)
    if given.get("name") is not None and not _UNIT_NAME_CHARS.fullmatch(str(given["name"])):
        raise UnitError(f"--name {given['name']!r}: use letters, digits and - _ . : only")
    unit = f"fcgi-engine-{name}"
    explicit_socket = given.get("socket")
    stream = listen_stream(str(explicit_socket)) if explicit_socket else f"/run/{name}.sock"
    argv = [*engine_command(), "serve"]
    for s in SETTINGS:
        if not s.flags or s.key in ("socket", "socket_mode"):
            continue
        value = given.get(s.key)
        if value is None:
            continue
        text = os.path.abspath(str(value)) if s.about.path else str(value)
        argv += [text] if s.positional else [s.flags[0], text]
    runtime = None
    if given.get("pidfile") is None:
        # A pidfile (and its control socket) lets `status`, `graceful` and `stop --pidfile`
        # reach the master; in a runtime directory of its own, removed when the unit stops.
        runtime = unit
        argv += ["--pidfile", f"/run/{unit}/{name}.pid"]
    cwd = os.path.abspath(working_directory or os.getcwd())
    service = f"""\
# {unit}.service: `fcgi-engine serve` under systemd, rendered by `fcgi-engine systemd`.
# systemd holds the socket ({unit}.socket) and starts this service with it.
# systemctl reload {unit}: new code, no request lost (a HUP); a release that fails
#   is rolled back, and `systemctl status {unit}` says why.
# systemctl restart {unit}: the master stops and starts; the socket stays open
#   meanwhile, so connections wait rather than fail.
[Unit]
Description=FastCGI server {_escape_specifiers(cfg.name)} (fcgi-engine)
Requires={unit}.socket
After={unit}.socket network.target

[Service]
# notify: the service is started once the first generation has proven itself (READY=1).
Type=notify
NotifyAccess=main
# Relative paths and module names given to `serve` meant this directory.
WorkingDirectory={cwd}
ExecStart={exec_line(argv)}
ExecReload=/bin/kill -HUP $MAINPID
# TERM to the master alone: it drains its workers; only what is left at the end is killed.
KillMode=mixed
Restart=on-failure
RestartSec=1s
TimeoutStartSec={_seconds(cfg.boot_timeout + _START_SLACK)}
TimeoutStopSec={_seconds(cfg.graceful_timeout + _STOP_SLACK)}
LimitNOFILE={_NOFILE}
{"RuntimeDirectory=" + runtime if runtime else "# pidfile: as given to serve"}
# The app sees this environment, not your shell's: add Environment=KEY=VALUE lines here.
# Optional: restart a master that stops answering (its workers keep serving meanwhile).
#WatchdogSec=30s

[Install]
WantedBy=multi-user.target
"""
    mode = f"{cfg.socket_mode:04o}"
    socket_unit = f"""\
# {unit}.socket: the listening socket of {unit}.service, held by systemd.
[Unit]
Description=FastCGI socket of {_escape_specifiers(cfg.name)} (fcgi-engine)

[Socket]
ListenStream={_escape_specifiers(stream)}
# The web server connects through the group ({socket_group}: Debian's nginx, Apache, lighttpd).
SocketMode={mode}
SocketGroup={socket_group}
Backlog=1024

[Install]
WantedBy=sockets.target
"""
    return Rendered(
        (Unit(f"{unit}.service", service), Unit(f"{unit}.socket", socket_unit)),
        (f"{unit}.socket", f"{unit}.service"),
    )


def _escape_specifiers(text: str) -> str:
    return text.replace("%", "%%")


# ---------------------------------------------------------------- the YAML's servers


def for_config(
    config_path: str, servers: Sequence[ServerConfig], names: Sequence[str] = ()
) -> Rendered:
    """The template unit fcgi-engine@.service for the servers of `config_path`, and the
    instances to enable: `names`, or every server."""
    known = {s.name: s for s in servers}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UnitError(
            f"no server {', '.join(map(repr, unknown))} in {config_path} (known: "
            f"{', '.join(known) or 'none'})"
        )
    chosen = [known[n] for n in dict.fromkeys(names)] if names else list(servers)
    bad = [s.name for s in chosen if not _UNIT_NAME_CHARS.fullmatch(s.name)]
    if bad:
        raise UnitError(
            f"server name {', '.join(map(repr, bad))} cannot be a unit instance: rename it "
            "using letters, digits and - _ . : only"
        )
    # One template serves every server: its bounds are the largest any server needs.
    boot = max((s.boot_timeout for s in servers), default=30.0)
    graceful = max((s.graceful_timeout for s in servers), default=30.0)
    config = os.path.abspath(config_path)
    argv = [*engine_command(), "-c", config, "run"]
    service = f"""\
# fcgi-engine@.service: fcgi-engine@NAME runs server NAME of {_escape_specifiers(config)}
# (rendered by `fcgi-engine systemd`: render it again when you change a server's boot_timeout
# or graceful_timeout, as its timeouts below cover the largest).
#   systemctl enable --now fcgi-engine@NAME   start it now and at boot
#   systemctl reload fcgi-engine@NAME         roll out new code (no request lost; a failed
#                                             release is rolled back, `status` says why)
#   systemctl reload 'fcgi-engine@*'          every server
# `fcgi-engine status|graceful|stop NAME` reach these masters too.
[Unit]
Description=FastCGI server %i of {_escape_specifiers(config)} (fcgi-engine)
After=network.target

[Service]
# notify: the service is started once the server's first generation has proven itself.
Type=notify
NotifyAccess=main
ExecStart={exec_line(argv)} %i
ExecReload=/bin/kill -HUP $MAINPID
# TERM to the master alone: it drains its workers; only what is left at the end is killed.
KillMode=mixed
Restart=on-failure
RestartSec=1s
TimeoutStartSec={_seconds(boot + _START_SLACK)}
TimeoutStopSec={_seconds(graceful + _STOP_SLACK)}
LimitNOFILE={_NOFILE}
# Optional: restart a master that stops answering (its workers keep serving meanwhile).
#WatchdogSec=30s

[Install]
WantedBy=multi-user.target
"""
    return Rendered(
        (Unit("fcgi-engine@.service", service),),
        tuple(f"fcgi-engine@{s.name}.service" for s in chosen),
    )


# ---------------------------------------------------------------- install


def install(rendered: Rendered, directory: str = DEFAULT_DIR) -> list[str]:
    """Write the units into `directory`; returns their paths. Raises UnitError."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise UnitError(f"{directory} is not a directory")
    try:
        pidfiles.check_directory(directory, "unit")
    except pidfiles.UnsafeDirectory as exc:
        raise UnitError(str(exc)) from None
    written = []
    for unit in rendered.units:
        path = os.path.join(directory, unit.filename)
        try:
            _write_unit(path, unit.text)
        except OSError as exc:
            raise UnitError(f"cannot write {path}: {exc.strerror or exc}") from None
        written.append(path)
    return written


def _write_unit(path: str, text: str) -> None:
    if os.path.islink(path):
        raise UnitError(
            f"{path} is a symlink (a masked or linked unit?): not replaced; remove it first"
        )
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        os.unlink(temp)
    except FileNotFoundError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, 0o644)
    try:
        try:
            os.fchmod(fd, 0o644)  # whatever the umask: systemd and `systemctl cat` read it
            data = text.encode()
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        # rename() replaces the name itself: a symlink planted since the check above is
        # replaced, never followed.
        os.rename(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
