"""Every server setting, declared once: key, type, default, help. The YAML loader and the
`serve` command line are both built from this table."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fcgi_engine.config.address import ANY, AddressError, AllowList


@dataclass(frozen=True)
class Setting:
    key: str
    kind: type | tuple[type, ...]
    default: Any
    help: str
    minimum: float | None = None


SETTINGS: tuple[Setting, ...] = (
    Setting("name", str, None, "the server's name (unique in the file)"),
    Setting("socket", str, None, "where to listen: a unix socket path or HOST:PORT"),
    Setting("pidfile", str, None, "the master's pidfile (default: derived from the name)"),
    Setting("app", str, None, "WSGI app as module:callable or path/to/file.py[:callable]"),
    Setting("scriptname", str, None, "a Python file defining `application`"),
    Setting("command", list, None, "any FastCGI program; it receives the socket as fd 0"),
    Setting("nproc", int, 2, "number of worker processes", 1),
    Setting("additional_args", list, [], "extra arguments for the command (or the app's argv)"),
    Setting("chdir", str, None, "directory to boot generations in (re-resolved every rollout)"),
    Setting("environment", dict, {}, "extra environment variables for the app"),
    Setting("python", str, None, "interpreter or virtualenv to boot generations with"),
    Setting(
        "user",
        str,
        None,
        "user the app runs as, its check import included (started as root; otherwise it must "
        "be the user we run as)",
    ),
    Setting("group", str, None, "group the app runs as (default: the user's; needs user)"),
    Setting("socket_mode", (int, str), "0660", "mode of a unix socket (octal)"),
    Setting("health", str, None, "path requested inside a new generation before it serves"),
    Setting("boot_timeout", (int, float), 30.0, "seconds a new generation has to be ready", 0.1),
    Setting("graceful_timeout", (int, float), 30.0, "seconds a draining worker may finish", 0),
    Setting("max_requests", int, 0, "recycle a worker after this many requests (0: never)", 0),
    Setting("max_requests_jitter", int, 0, "random extra requests before recycling", 0),
    Setting(
        "timeout", (int, float), 0.0, "kill a worker stuck on one request this long (0: off)", 0
    ),
    Setting("max_body_size", int, 0, "largest request body in bytes (0: no limit)", 0),
    Setting("max_params_size", int, 1 << 20, "largest encoded params of one request", 1024),
    Setting("script_name", str, None, "the app's mount point (SCRIPT_NAME); default: root"),
    Setting(
        "allowed_addrs",
        (list, str),
        [],
        "TCP peers allowed: a list (or comma-separated string) of IPs and CIDR ranges, or `any` "
        "(default: $FCGI_WEB_SERVER_ADDRS, else loopback only)",
    ),
    Setting(
        "params_timeout",
        (int, float),
        10.0,
        "seconds a request's params may take to arrive, from its first byte (or the accept)",
        0.1,
    ),
    Setting(
        "body_timeout",
        (int, float),
        60.0,
        "seconds a request body may take to arrive, plus 1 s per body_min_rate bytes received",
        0.1,
    ),
    Setting(
        "body_min_rate",
        int,
        65536,
        "bytes per second that extend body_timeout by 1 s (0: no extension)",
        0,
    ),
    Setting(
        "idle_timeout",
        (int, float),
        120.0,
        "seconds a kept-alive connection may wait for its next request (keep it above the web "
        "server's own keep-alive timeout: nginx closes upstream connections after 60 s)",
        0.1,
    ),
    Setting(
        "send_timeout",
        (int, float),
        60.0,
        "seconds a response may wait for the web server to read any of it",
        0.1,
    ),
    Setting(
        "heartbeat_timeout",
        (int, float),
        10.0,
        "replace a worker that makes no progress outside a request this long (0: off)",
        0,
    ),
    Setting(
        "worker_connections",
        int,
        1000,
        "most connections one worker holds open; past it, it stops accepting",
        1,
    ),
    Setting(
        "body_buffer_size",
        int,
        1 << 20,
        "request bodies larger than this are spooled to a temporary file before the app runs",
        0,
    ),
    Setting("access_log", str, None, "access log file"),
    Setting("error_log", str, None, "error log file (default: stderr)"),
)
SETTING_BY_KEY = {s.key: s for s in SETTINGS}


@dataclass(frozen=True)
class ServerConfig:
    name: str
    socket: str
    pidfile: str | None = None
    app: str | None = None
    scriptname: str | None = None
    command: list[str] | None = None
    nproc: int = 2
    additional_args: list[str] = field(default_factory=list)
    chdir: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    python: str | None = None
    user: str | None = None
    group: str | None = None
    socket_mode: int = 0o660
    health: str | None = None
    boot_timeout: float = 30.0
    graceful_timeout: float = 30.0
    max_requests: int = 0
    max_requests_jitter: int = 0
    timeout: float = 0.0
    max_body_size: int = 0
    max_params_size: int = 1 << 20
    script_name: str | None = None
    allowed_addrs: list[str] = field(default_factory=list)
    params_timeout: float = 10.0
    body_timeout: float = 60.0
    body_min_rate: int = 65536
    idle_timeout: float = 120.0
    send_timeout: float = 60.0
    heartbeat_timeout: float = 10.0
    worker_connections: int = 1000
    body_buffer_size: int = 1 << 20
    access_log: str | None = None
    error_log: str | None = None

    @property
    def app_spec(self) -> str | None:
        return self.app or self.scriptname

    @property
    def control_path(self) -> str | None:
        return self.pidfile + ".ctl" if self.pidfile else None


def parse_mode(value: int | str) -> int:
    """A socket mode: 0660, "0660" or "660" all mean rw-rw----."""
    if isinstance(value, int):
        # YAML reads 0660 as octal (432): such values are modes already. An unquoted 660 is
        # read as decimal, which is larger than any mode: its digits are the octal mode.
        if 0 <= value <= 0o777:
            return value
        text = str(value)
        if re.fullmatch(r"[0-7]{3,4}", text):
            return int(text, 8)
        raise ValueError(f"{value!r} is not an octal mode like 0660")
    if not re.fullmatch(r"0?o?[0-7]{3,4}", value.strip()):
        raise ValueError(f"{value!r} is not an octal mode like 0660")
    return int(value.strip().replace("o", ""), 8)


def default_runtime_dir() -> str:
    """Where pidfiles go when the config names none: a directory only we may write to."""
    if os.geteuid() == 0:
        return "/run/fcgi-engine"
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(xdg):
        return os.path.join(xdg, "fcgi-engine")
    # /tmp is shared by every user: a fixed name there would belong to whoever created it first
    # (and be refused to everyone else). One directory per uid cannot collide with another
    # user's; one planted under our name is refused, never trusted.
    return f"/tmp/fcgi-engine-{os.geteuid()}"


def default_pidfile(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return os.path.join(default_runtime_dir(), f"{safe}.pid")


def web_server_addrs_from_env() -> list[str]:
    raw = os.environ.get("FCGI_WEB_SERVER_ADDRS", "")
    return [a.strip() for a in raw.split(",") if a.strip()]


def parse_allowed_addrs(value: str | Sequence[Any]) -> list[str]:
    """`allowed_addrs` as written: a list, or a comma-separated string, of IPs and CIDR ranges
    (IPv4 or IPv6), or `any`. Returns the entries, `any` spelled in lower case.

    Raises AddressError (a ValueError) naming the bad entry.
    """
    parts = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    entries = [part.strip() for part in parts if part.strip()]
    if not entries:
        raise AddressError(
            "is empty: list the web server's addresses (IPs or CIDR ranges), or write any"
        )
    entries = [ANY if entry.lower() == ANY else entry for entry in entries]
    if ANY in entries and len(entries) > 1:
        raise AddressError(
            "'any' allows every peer: give either any or a list of addresses, not both"
        )
    AllowList(entries)  # raises AddressError naming the first entry that is not an address
    return entries


@dataclass(frozen=True)
class RunAs:
    """The identity the app runs as: every import of app code switches to it (as root only)."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups, as initgroups(user, gid) sets them
    home: str


class IdentityError(ValueError):
    """`user:`/`group:` name nobody, or someone we cannot become; the message says what to do."""


GROUP_NEEDS_USER = "group: needs user: (write user: root to keep root)"


def run_as(user: str | None, group: str | None) -> RunAs | None:
    """Whom to run the app as, or None when it runs as we do.

    Not root, we cannot switch: a config naming another user (or group) is an error, never
    silently run as ourselves instead.
    """
    if not user and not group:
        return None
    if not user:
        raise IdentityError(GROUP_NEEDS_USER)
    import grp
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise IdentityError(f"no such user {user!r} (user:)") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise IdentityError(f"no such group {group!r} (group:)") from None
    euid = os.geteuid()
    if euid != 0:
        if pw.pw_uid != euid:
            raise IdentityError(
                f"cannot run the app as user {user}: only root can switch users, and this runs "
                f"as uid {euid}; start it as root, or remove user:"
            )
        if group and gid != os.getegid():
            raise IdentityError(
                f"cannot run the app as group {group}: only root can switch groups, and this "
                f"runs as gid {os.getegid()}; start it as root, or remove group:"
            )
        return None
    return RunAs(pw.pw_name, pw.pw_uid, gid, tuple(os.getgrouplist(pw.pw_name, gid)), pw.pw_dir)
