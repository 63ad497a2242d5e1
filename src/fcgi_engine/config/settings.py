"""Every server setting, declared once: ServerConfig's fields ARE the table.

Each field is declared with `setting(default, help, ...)` (or, for a required key, a bare
`field(metadata=about(help, ...))`): its name is the YAML key, its annotation the type, and the
metadata its limits, its `serve` flag (or why it has none) and how it is shown. SETTINGS is
derived from the fields; the YAML loader, the `serve` flags and `serve --help`, and the README's
key list (`settings_markdown`, checked by a test) are all built from it. Adding a setting is one
field here.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar, cast

from fcgi_engine.config.address import (
    ANY,
    LOOPBACK,
    AddressError,
    AllowList,
    TcpAddress,
    is_loopback_host,
    parse_address,
)

T = TypeVar("T")

# ---------------------------------------------------------------- values as written


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


def parse_allowed_addrs(value: str | Sequence[Any]) -> list[str]:
    """`allowed_addrs` as written: a list, or a comma-separated string, of IPs and CIDR ranges
    (IPv4 or IPv6), or `any`. Returns the entries, `any` spelled in lower case.

    Raises AddressError (a ValueError) naming the bad entry.
    """
    if not isinstance(value, str) and not all(isinstance(v, str) for v in value):
        raise AddressError("must be a list of IP addresses or CIDR ranges (strings)")
    parts = value.split(",") if isinstance(value, str) else list(value)
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


def _url_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must be a path starting with /")
    return value


def _program(value: list[Any]) -> list[str]:
    if not value or not all(isinstance(part, str) for part in value):
        raise ValueError("must be a non-empty list of strings")
    return list(value)


def _arguments(value: list[Any]) -> list[str]:
    if not all(isinstance(v, (str, int, float)) for v in value):
        raise ValueError("must be a list of strings")
    return [str(v) for v in value]


def _string_map(value: Mapping[Any, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()}


# ---------------------------------------------------------------- how a setting is declared


@dataclass(frozen=True)
class About:
    """What a field's metadata says about its setting (beyond its name, type and default)."""

    help: str
    minimum: float | None = None  # numbers below it are refused
    flags: tuple[str, ...] = ()  # the `serve` flags (default: --the-key); a bare name: positional
    metavar: str | None = None
    yaml_only: str = ""  # why `serve` has no flag for it ("": it has one)
    also: type | None = None  # another type the YAML may write it as (parse turns it into ours)
    parse: Callable[[Any], Any] | None = None  # checks and converts a value of the right type
    choices: tuple[str, ...] = ()  # the only values it takes (`serve --help` lists them)
    path: bool = False  # a file or directory: relative to the YAML file (serve: to the cwd)
    per_server: bool = False  # unique to each server: not allowed in `defaults`
    unit: str = ""  # "s", "B" or "B/s": how the default is shown
    zero: str = ""  # what a default of 0 means, shown instead of it
    shown: str = ""  # the default as shown, where it is not the value itself


def about(help: str, **kw: Any) -> dict[str, About]:
    """Field metadata for a setting; for a required key: `field(metadata=about(...))`."""
    return {"setting": About(help, **kw)}


def setting(default: T, help: str, **kw: Any) -> T:
    """A setting with a default: a dataclass field whose metadata describes it (see About)."""
    if isinstance(default, (list, dict)):
        copy = default.copy
        return cast(T, field(default_factory=copy, metadata=about(help, **kw)))
    return cast(T, field(default=default, metadata=about(help, **kw)))


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class ServerConfig:
    name: str = field(
        metadata=about(
            "the server's name, unique in the file (serve: default APP)", per_server=True
        )
    )
    socket: str = field(
        metadata=about(
            "where to listen: a unix socket path or HOST:PORT (serve without it: fd 0 from the "
            "web server, or systemd socket activation)",
            flags=("--listen", "-l"),
            metavar="ADDR",
            per_server=True,
        )
    )
    pidfile: str | None = setting(
        None,
        "the master's pidfile, with its control socket beside it (YAML default: NAME.pid in "
        "/run/fcgi-engine as root, else in $XDG_RUNTIME_DIR/fcgi-engine; serve: none)",
        flags=("--pidfile", "-p"),
        path=True,
        per_server=True,
    )
    app: str | None = setting(
        None,
        "WSGI or ASGI app: module:callable, module (callable `application`: Django's "
        "mysite.wsgi), path/to/file.py[:callable], or module:create_app(...) (a factory, literal "
        "arguments)",
        flags=("app",),
        metavar="APP",
    )
    scriptname: str | None = setting(
        None,
        "a Python file defining `application` (its directory is the default chdir)",
        yaml_only="serve's APP takes a file too",
        path=True,
    )
    command: list[str] | None = setting(
        None,
        "any FastCGI program, as a list; it receives the socket as fd 0",
        yaml_only="serve runs Python apps; FastCGI programs are configured in the YAML",
        parse=_program,
    )
    nproc: int = setting(2, "number of worker processes", minimum=1, flags=("--nproc", "-n"))
    interface: str = setting(
        "auto",
        "how the app is called: wsgi, asgi, or auto (an async callable app(scope, receive, send) "
        "is ASGI 3, any other callable WSGI)",
        choices=("auto", "wsgi", "asgi"),
    )
    threads: int = setting(
        1,
        "WSGI requests one worker serves at once, each in a thread (1: no threads, the fastest "
        "path for apps that do not wait)",
        minimum=1,
    )
    max_concurrency: int = setting(
        100,
        "ASGI requests one worker serves at once; past it new requests wait, they are not dropped",
        minimum=1,
    )
    lifespan: str = setting(
        "auto",
        "ASGI lifespan events: on (a failing startup fails the boot), off, or auto (on unless "
        "the app does not support them)",
        choices=("auto", "on", "off"),
    )
    additional_args: list[str] = setting(
        [],
        "extra arguments for the command (or the app's sys.argv)",
        yaml_only="a list: serve gives the app no arguments",
        parse=_arguments,
    )
    chdir: str | None = setting(
        None, "directory to boot generations in (re-resolved every rollout)", path=True
    )
    environment: dict[str, str] = setting(
        {},
        "extra environment variables for the app",
        yaml_only="serve's app inherits the environment serve runs in",
        parse=_string_map,
    )
    python: str | None = setting(None, "interpreter or virtualenv to boot generations with")
    user: str | None = setting(
        None,
        "user the app runs as, its check import included (started as root; otherwise it must "
        "be the user we run as)",
    )
    group: str | None = setting(None, "group the app runs as (default: the user's; needs user)")
    socket_mode: int = setting(
        0o660,
        "mode of a unix socket, in octal",
        also=str,
        parse=parse_mode,
        shown="0660",
        metavar="MODE",
    )
    health: str | None = setting(
        None,
        "path that must answer 2xx inside a new generation before it serves",
        metavar="PATH",
        parse=_url_path,
    )
    boot_timeout: float = setting(
        30.0, "seconds a new generation has to be ready", minimum=0.1, unit="s"
    )
    drain_delay: float = setting(
        0.0,
        "seconds a server told to stop (TERM) goes on serving, reporting not ready, before it "
        "stops accepting: time for a load balancer to stop sending it requests",
        minimum=0,
        unit="s",
        zero="none",
    )
    status_listen: str | None = setting(
        None,
        "HOST:PORT (or unix socket path) of an HTTP listener on the master for orchestrators: "
        "/readyz, /livez and /status (JSON); answered without app code",
        metavar="ADDR",
        per_server=True,
    )
    graceful_timeout: float = setting(
        30.0, "seconds a draining worker may finish", minimum=0, unit="s"
    )
    max_requests: int = setting(
        0, "recycle a worker after this many requests", minimum=0, zero="never"
    )
    max_memory: int = setting(
        0,
        "recycle a worker whose resident memory (RSS) grows past this many bytes: it finishes "
        "its requests and hands its idle connections on",
        minimum=0,
        unit="B",
        zero="never",
    )
    max_requests_jitter: int = setting(
        0, "random extra requests before recycling", minimum=0, zero="none"
    )
    timeout: float = setting(
        0.0,
        "kill a worker stuck on one request this many seconds",
        minimum=0,
        unit="s",
        zero="off",
    )
    max_body_size: int = setting(
        0, "largest request body, in bytes", minimum=0, unit="B", zero="no limit"
    )
    max_params_size: int = setting(
        1 << 20, "largest encoded params of one request, in bytes", minimum=1024, unit="B"
    )
    script_name: str | None = setting(
        None, "the app's mount point (SCRIPT_NAME); default: the root"
    )
    allowed_addrs: list[str] = setting(
        [],
        "TCP peers allowed: a list (or comma-separated string) of IPs and CIDR ranges, or `any` "
        "(default: $FCGI_WEB_SERVER_ADDRS, else loopback only)",
        metavar="LIST",
        also=str,
        parse=parse_allowed_addrs,
    )
    params_timeout: float = setting(
        10.0,
        "seconds a request's params may take to arrive, from its first byte (or the accept)",
        minimum=0.1,
        unit="s",
    )
    body_timeout: float = setting(
        60.0,
        "seconds a request body may take to arrive, plus 1 s per body_min_rate bytes received",
        minimum=0.1,
        unit="s",
    )
    body_min_rate: int = setting(
        65536,
        "bytes per second that extend body_timeout by 1 s (0: no extension)",
        minimum=0,
        unit="B/s",
    )
    idle_timeout: float = setting(
        120.0,
        "seconds a kept-alive connection may wait for its next request (keep it above the web "
        "server's own keep-alive timeout: nginx closes upstream connections after 60 s)",
        minimum=0.1,
        unit="s",
    )
    send_timeout: float = setting(
        60.0,
        "seconds a response may wait for the web server to read any of it",
        minimum=0.1,
        unit="s",
    )
    heartbeat_timeout: float = setting(
        10.0,
        "replace a worker that makes no progress outside a request this many seconds (0: off)",
        minimum=0,
        unit="s",
    )
    worker_connections: int = setting(
        1000, "most connections one worker holds open; past it, it stops accepting", minimum=1
    )
    body_buffer_size: int = setting(
        1 << 20,
        "request bodies larger than this many bytes are spooled to a temporary file before the "
        "app runs",
        minimum=0,
        unit="B",
    )
    access_log: str | None = setting(
        None, "access log file, one line per request (USR1 reopens it)", path=True
    )
    error_log: str | None = setting(
        None, "error log file (default: stderr; USR1 reopens it)", path=True
    )
    access_log_format: str = setting(
        "combined",
        "access log line: combined (nginx's, plus the time taken) or json (one object a line)",
        choices=("combined", "json"),
    )
    log_level: str = setting(
        "info",
        "least severe message the error log keeps",
        choices=("debug", "info", "warning", "error", "critical"),
    )
    slowlog: str | None = setting(
        None,
        "file that receives the Python stack of a request running past slowlog_timeout "
        "(default: the error log)",
        path=True,
    )
    slowlog_timeout: float = setting(
        0.0,
        "seconds after which a running request's stack is written to the slowlog (the request "
        "goes on)",
        minimum=0,
        unit="s",
        zero="off",
    )
    status_path: str | None = setting(
        None,
        "path answered by the engine itself (not the app) with the server's status: JSON, or "
        "OpenMetrics with ?openmetrics or Accept: application/openmetrics-text",
        metavar="PATH",
        parse=_url_path,
    )

    @property
    def app_spec(self) -> str | None:
        return self.app or self.scriptname

    @property
    def control_path(self) -> str | None:
        return self.pidfile + ".ctl" if self.pidfile else None


@dataclass(frozen=True)
class Setting:
    """One row of the table: a ServerConfig field as the YAML and `serve` see it."""

    key: str
    kinds: tuple[type, ...]  # the types the YAML may write it as
    default: Any  # as ServerConfig holds it (None for a required key)
    required: bool
    about: About

    @property
    def help(self) -> str:
        return self.about.help

    @property
    def minimum(self) -> float | None:
        return self.about.minimum

    @property
    def flags(self) -> tuple[str, ...]:
        """`serve`'s flags for it: () when it is YAML-only, a bare name when positional."""
        if self.about.yaml_only:
            return ()
        return self.about.flags or ("--" + self.key.replace("_", "-"),)

    @property
    def positional(self) -> bool:
        """`serve` takes it as an argument (APP), not as a --flag."""
        return bool(self.flags) and not self.flags[0].startswith("-")

    @property
    def flag(self) -> str:
        """How `serve` names it in messages: --the-flag, or APP."""
        if not self.flags:
            return self.key
        return (self.about.metavar or self.key.upper()) if self.positional else self.flags[0]

    def check(self, value: Any) -> Any:
        """The value as ServerConfig holds it; ValueError says what is wrong with it."""
        if isinstance(value, bool) or not isinstance(value, self.kinds):
            wanted = " or ".join(k.__name__ for k in self.kinds)
            # A mapping from the loader is a line-tracking dict subclass: show what was written.
            got = "mapping" if isinstance(value, dict) else type(value).__name__
            shown = dict(value) if isinstance(value, dict) else value
            raise ValueError(f"must be {wanted}, got {got} {shown!r}")
        minimum = self.about.minimum
        if minimum is not None and isinstance(value, (int, float)) and value < minimum:
            raise ValueError(f"must be at least {minimum:g}, got {value!r}")
        if self.about.choices and value not in self.about.choices:
            raise ValueError(f"must be one of {', '.join(self.about.choices)}, not {value!r}")
        return self.about.parse(value) if self.about.parse else value

    def shown_default(self) -> str:
        """The default as the README and `serve --help` show it ("" when there is none)."""
        a, value = self.about, self.default
        if self.required:
            return "required"
        if a.shown:
            return a.shown
        if value is None or value == [] or value == {}:
            return ""
        if value == 0 and a.zero:
            return a.zero
        if a.unit in ("B", "B/s"):
            return _size(value) + a.unit[1:]
        text = f"{value:g}" if isinstance(value, float) else str(value)
        return f"{text} {a.unit}" if a.unit else text


def _size(n: int) -> str:
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def _kinds(annotation: Any, also: type | None) -> tuple[type, ...]:
    """The YAML types of a field annotated `annotation`: a float may be written as an int."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    inner = [a for a in args if a is not type(None)] or [annotation]
    kinds: list[type] = []
    for a in inner:
        base = typing.get_origin(a) or a
        kinds += [int, float] if base is float else [base]
    return (*kinds, also) if also else tuple(kinds)


def _table() -> tuple[Setting, ...]:
    hints = typing.get_type_hints(ServerConfig)
    rows = []
    for f in fields(ServerConfig):
        a = f.metadata["setting"]
        factory = f.default_factory
        required = f.default is MISSING and factory is MISSING
        default = factory() if factory is not MISSING else (None if required else f.default)
        rows.append(Setting(f.name, _kinds(hints[f.name], a.also), default, required, a))
    return tuple(rows)


SETTINGS: tuple[Setting, ...] = _table()
SETTING_BY_KEY = {s.key: s for s in SETTINGS}
APP_KEYS = ("app", "scriptname", "command")  # a server runs exactly one of these


def group_needs_user(spell: Callable[[str], str]) -> str:
    """The message for a group without a user, the keys spelled as the caller writes them."""
    user = spell("user")
    return (
        f"{spell('group')} needs {user} (write {user} root to keep root): without it the app "
        "would keep uid 0"
    )


GROUP_NEEDS_USER = group_needs_user(lambda key: key + ":")


def cross_check(
    values: Mapping[str, Any], spell: Callable[[str], str] = lambda key: key + ":"
) -> tuple[str, str] | None:
    """The rules between settings: (key, message) for the first one `values` breaks, else None.

    `spell` names a key as the user wrote it (`group:` in the YAML, `--group` on `serve`).
    """
    for s in SETTINGS:
        if s.required and s.key not in values:
            return s.key, "missing required key"
    chosen = [k for k in APP_KEYS if k in values]
    if len(chosen) != 1:
        return chosen[1] if len(
            chosen
        ) > 1 else "app", "give exactly one of app, scriptname or command"
    if values.get("group") and not values.get("user"):
        return "group", group_needs_user(spell)
    return None


SETTINGS_BEGIN = "<!-- settings: generated by fcgi_engine.config.settings.settings_markdown -->"
SETTINGS_END = "<!-- settings: end -->"


def settings_markdown() -> str:
    """The README's key list: a markdown table of SETTINGS, between its marker comments."""
    lines = [SETTINGS_BEGIN, "| key | default | `serve` | meaning |", "| --- | --- | --- | --- |"]
    for s in SETTINGS:
        if not s.flags:
            flag = f"none: {s.about.yaml_only}"
        elif s.positional:
            flag = s.flag
        else:
            flag = ", ".join(f"`{f}`" for f in s.flags)
        meaning = s.help.replace("|", "\\|")
        lines.append(f"| `{s.key}` | {s.shown_default()} | {flag} | {meaning} |")
    lines.append(SETTINGS_END)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- where things go by default


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


@dataclass(frozen=True)
class AllowedAddrs:
    """What a TCP listener of this server accepts, and which setting said so (for the log)."""

    entries: list[str]
    source: str  # "allowed_addrs", "FCGI_WEB_SERVER_ADDRS" or "default"

    @property
    def any(self) -> bool:
        return ANY in self.entries


def resolve_allowed_addrs(cfg: ServerConfig) -> AllowedAddrs:
    """The server's `allowed_addrs`, else $FCGI_WEB_SERVER_ADDRS, else loopback only.

    A TCP listener that nobody restricted accepts this host only: any local user could otherwise
    connect and set REMOTE_USER, REMOTE_ADDR or HTTPS for the app. Raises AddressError for an
    entry of $FCGI_WEB_SERVER_ADDRS that is not an address (the config's own entries were
    checked when it was loaded).
    """
    if cfg.allowed_addrs:
        return AllowedAddrs(list(cfg.allowed_addrs), "allowed_addrs")
    from_env = web_server_addrs_from_env()
    if from_env:
        try:
            AllowList(from_env)
        except AddressError as exc:
            raise AddressError(f"$FCGI_WEB_SERVER_ADDRS: {exc}") from None
        return AllowedAddrs(
            [ANY if e.lower() == ANY else e for e in from_env], "FCGI_WEB_SERVER_ADDRS"
        )
    return AllowedAddrs(list(LOOPBACK), "default")


def loopback_only_warning(cfg: ServerConfig) -> str | None:
    """The warning for a server that listens on a network (TCP, not loopback) with nobody's
    allow-list (no `allowed_addrs`, no $FCGI_WEB_SERVER_ADDRS): it will accept loopback peers
    only, which on several hosts means nginx on another host is refused. None when that is not
    the case (a unix socket, a loopback listener, an allow-list, or a `command:` program that
    filters peers itself)."""
    if cfg.command:
        return None
    try:
        address = parse_address(cfg.socket, any_port=True)
    except AddressError:
        return None  # reported where the socket is opened
    if not isinstance(address, TcpAddress) or is_loopback_host(address.host):
        return None
    try:
        if resolve_allowed_addrs(cfg).source != "default":
            return None
    except AddressError:
        return None  # a bad $FCGI_WEB_SERVER_ADDRS is an error of its own
    return (
        f"{cfg.name}: listens on {address} but will accept loopback peers only (no "
        "allowed_addrs, no $FCGI_WEB_SERVER_ADDRS); to accept the web servers on other hosts, "
        "set allowed_addrs to their addresses or ranges (e.g. [198.18.0.0/15, 'fd00::/8'])"
    )


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
