"""The YAML loader: a bare list of servers (the seed format) or {defaults, servers}.

Every error names the file, the server and the key, and the line where YAML gives one; nothing is
started from an invalid file.
"""

from __future__ import annotations

import os
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


def find_config(explicit: str | None) -> str:
    return explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


def load_config(path: str) -> list[ServerConfig]:
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
                "unknown top-level key (expected defaults and servers)",
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
                raise ConfigError(
                    path,
                    "not allowed in defaults" if known else "unknown key",
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
    return servers


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
            raise error(str(key), "unknown key")
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
        if key in values:
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
