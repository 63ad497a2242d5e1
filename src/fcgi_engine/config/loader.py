"""The YAML loader: a bare list of servers (the seed format) or {defaults, servers}.

Every error names the file, the server and the key, and the line where YAML gives one; nothing is
started from an invalid file.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from fcgi_engine.config.address import AddressError, UnixAddress, parse_address
from fcgi_engine.config.settings import (
    SETTING_BY_KEY,
    SETTINGS,
    ServerConfig,
    cross_check,
    default_pidfile,
)

CONFIG_ENV = "FCGI_ENGINE_CONFIG"
DEFAULT_CONFIG = "fcgi-engine.yml"
PATH_KEYS = tuple(s.key for s in SETTINGS if s.about.path)
UNIQUE_KEYS = tuple(s.key for s in SETTINGS if s.about.per_server)


class ConfigError(Exception):
    """The config is missing or invalid; the message names file, server, key and line."""

    def __init__(
        self,
        path: str,
        message: str,
        server: str | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        where = path + (f":{line}" if line else "")
        what = "".join((f" server {server!r}" if server else "", f" key {key!r}" if key else ""))
        super().__init__(f"{where}:{what}{':' if what else ''} {message}")
        self.path, self.server, self.key, self.line = path, server, key, line


class _Mapping(dict[str, Any]):
    lines: dict[str, int]
    line: int


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Mapping:
    mapping = _Mapping()
    mapping.lines = {}
    mapping.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[str(key)] = key_node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def unknown_key(key: object, known: Iterable[str]) -> str:
    """The message for a key nobody declared (ConfigError names it), with the closest known
    ones: a typo says what was meant."""
    close = difflib.get_close_matches(str(key), list(known), n=2, cutoff=0.7)
    hint = " or ".join(repr(k) for k in close)
    return "unknown key" + (f"; did you mean {hint}?" if hint else "")


def find_config(explicit: str | None) -> str:
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


@dataclass(frozen=True)
class Located:
    """A loaded server and where the file wrote it, so later checks can name file, key and line."""

    server: ServerConfig
    path: str
    line: int | None  # the server's own line
    lines: dict[str, int]  # each key the server's entry wrote: its line

    def error(self, key: str | None, message: str) -> ConfigError:
        return ConfigError(
            self.path,
            message,
            server=self.server.name,
            key=key,
            line=self.lines.get(key or "", self.line),
        )


def load_config(path: str) -> list[ServerConfig]:
    """The servers of the config file at `path`; ConfigError names what is wrong and where."""
    return [located.server for located in load_located(path)]


def load_located(path: str) -> list[Located]:
    """load_config, each server with where it was written."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(path, "no such config file") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(
            path, f"not valid YAML: {getattr(exc, 'problem', exc)}", line=line
        ) from None
    base = os.path.dirname(os.path.abspath(path))
    defaults: dict[str, Any] = {}
    entries: Any
    if isinstance(data, list):
        entries = data
    elif isinstance(data, dict):
        unknown = set(data) - {"defaults", "servers"}
        if unknown:
            key = sorted(map(str, unknown))[0]
            raise ConfigError(
                path,
                unknown_key(key, ("defaults", "servers"))
                + " (the top level has defaults and servers only)",
                key=key,
                line=getattr(data, "lines", {}).get(key),
            )
        entries = data.get("servers")
        if not isinstance(entries, list):
            raise ConfigError(path, "'servers' must be a list of servers", key="servers")
        raw_defaults = data.get("defaults") or {}
        if not isinstance(raw_defaults, dict):
            raise ConfigError(path, "'defaults' must be a mapping", key="defaults")
        defaults = dict(raw_defaults)
        for key in defaults:
            known = SETTING_BY_KEY.get(key)
            if known is None or known.about.per_server:
                allowed = (s.key for s in SETTINGS if not s.about.per_server)
                raise ConfigError(
                    path,
                    "not allowed in defaults" if known else unknown_key(key, allowed),
                    key=str(key),
                    line=getattr(raw_defaults, "lines", {}).get(str(key)),
                )
    elif data is None:
        raise ConfigError(path, "the file is empty: list at least one server")
    else:
        raise ConfigError(path, "expected a list of servers or a mapping with 'servers'")
    if not entries:
        raise ConfigError(path, "no servers are configured")
    servers = [_server(path, base, i, entry, defaults) for i, entry in enumerate(entries)]
    _check_unique(path, servers, entries)
    return [
        Located(server, path, getattr(entry, "line", None), dict(getattr(entry, "lines", {})))
        for server, entry in zip(servers, entries, strict=True)
    ]


def directory_problem(located: Located) -> ConfigError | None:
    """What would make `start` fail before any app code runs, for a check to say first: a unix
    socket in a directory that does not exist (the master binds there, it creates no
    directory), or a pidfile whose missing directory cannot be created."""
    server = located.server
    missing = missing_socket_directory(server.socket)
    if missing:
        return located.error(
            "socket",
            f"the socket's directory {missing} does not exist; create it (the server creates "
            "the socket, not its directory), or choose another socket path",
        )
    if server.pidfile:
        directory = os.path.dirname(os.path.abspath(server.pidfile))
        blocker = _uncreatable(directory)
        if blocker:
            return located.error(
                "pidfile",
                f"the pidfile's directory {directory} does not exist and cannot be created: "
                f"{blocker}",
            )
    return None


def missing_socket_directory(socket: str) -> str | None:
    """The directory of a unix socket address when it does not exist, else None."""
    try:
        address = parse_address(socket)
    except AddressError:
        return None  # fd:0 (serve), or an address the loader has refused already
    if not isinstance(address, UnixAddress):
        return None
    directory = os.path.dirname(os.path.abspath(address.path))
    return None if os.path.isdir(directory) else directory


def _uncreatable(directory: str) -> str:
    """Why `directory` cannot be made with makedirs by us ("" when it exists or can be)."""
    if os.path.isdir(directory):
        return ""
    parent = directory
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable by uid {os.geteuid()}"
    return ""


def directory_problems(located: Sequence[Located]) -> dict[str, ConfigError]:
    """directory_problem for each server that has one, by server name."""
    found = {}
    for one in located:
        problem = directory_problem(one)
        if problem is not None:
            found[one.server.name] = problem
    return found


def _server(path: str, base: str, index: int, entry: Any, defaults: dict[str, Any]) -> ServerConfig:
    if not isinstance(entry, dict):
        raise ConfigError(
            path,
            f"server #{index + 1} must be a mapping of keys",
            line=getattr(entry, "line", None),
        )
    lines: dict[str, int] = getattr(entry, "lines", {})
    name = entry.get("name")
    label = str(name) if name is not None else f"#{index + 1}"

    def error(key: str | None, message: str) -> ConfigError:
        return ConfigError(
            path,
            message,
            server=label,
            key=key,
            line=lines.get(key or "", getattr(entry, "line", None)),
        )

    for key in entry:
        if key not in SETTING_BY_KEY:
            raise error(str(key), unknown_key(key, SETTING_BY_KEY))
    merged = {**defaults, **entry}
    values: dict[str, Any] = {}
    for key, value in merged.items():
        if value is None:
            continue
        try:
            values[key] = SETTING_BY_KEY[key].check(value)
        except ValueError as exc:
            raise error(key, str(exc)) from None
    problem = cross_check(values)
    if problem:
        raise error(*problem)
    if "command" in values:
        command = values["command"]
        if os.sep in command[0] and not os.path.isabs(command[0]):
            values["command"] = [os.path.join(base, command[0]), *command[1:]]
    try:
        address = parse_address(str(values["socket"]))
    except AddressError as exc:
        raise error("socket", str(exc)) from None
    if isinstance(address, UnixAddress):
        values["socket"] = os.path.join(base, address.path)
    for key in PATH_KEYS:
        # "-" is a standard stream (access_log: stdout; error_log: stderr), not a file name.
        if key in values and values[key] != "-":
            values[key] = os.path.join(base, os.path.expanduser(values[key]))
    if "scriptname" in values and "chdir" not in values:
        values["chdir"] = os.path.dirname(values["scriptname"])
    values.setdefault("pidfile", default_pidfile(values["name"]))
    return ServerConfig(**values)


def _check_unique(path: str, servers: list[ServerConfig], entries: list[Any]) -> None:
    seen: dict[str, str] = {}
    for server, entry in zip(servers, entries, strict=True):
        lines = getattr(entry, "lines", {})
        for key in UNIQUE_KEYS:
            value = getattr(server, key)
            if value is None:  # unset (an optional key such as status_listen)
                continue
            marker = f"{key}={value}"
            if marker in seen:
                raise ConfigError(
                    path,
                    f"duplicate {key} {value!r} (also used by server {seen[marker]!r})",
                    server=server.name,
                    key=key,
                    line=lines.get(key),
                )
            seen[marker] = server.name
