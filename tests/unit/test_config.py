"""The YAML loader and ADDR parsing: every error names file, server, key and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from fcgi_engine.config.address import AddressError, TcpAddress, UnixAddress, parse_address
from fcgi_engine.config.loader import (
    ConfigError,
    directory_problem,
    directory_problems,
    load_config,
    load_located,
)
from fcgi_engine.config.settings import parse_mode

SEED = """\
- name: "shop.server"
  nproc: 4
  scriptname: "/srv/shop/current/shop.wsgi"
  pidfile: "/run/shop.pid"
  socket: "/run/shop.sock"
  additional_args: ["--verbose"]
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "fcgi-engine.yml"
    path.write_text(text)
    return str(path)


def test_seed_list_format_loads_as_written(tmp_path: Path) -> None:
    [server] = load_config(write(tmp_path, SEED))
    assert server.name == "shop.server" and server.nproc == 4
    assert server.scriptname == "/srv/shop/current/shop.wsgi"
    assert server.app_spec == "/srv/shop/current/shop.wsgi"
    assert server.chdir == "/srv/shop/current"
    assert server.pidfile == "/run/shop.pid" and server.socket == "/run/shop.sock"
    assert server.additional_args == ["--verbose"]
    assert server.control_path == "/run/shop.pid.ctl"


def test_mapping_format_applies_defaults_and_resolves_paths(tmp_path: Path) -> None:
    servers = load_config(
        write(
            tmp_path,
            """\
defaults: {nproc: 3, graceful_timeout: 10}
servers:
  - name: api
    app: "api.main:app"
    socket: "127.0.0.1:9001"
    health: /healthz
    socket_mode: "0600"
  - name: php
    command: ["/usr/bin/php-cgi"]
    socket: run/php.sock
    nproc: 1
""",
        )
    )
    api, php = servers
    assert (api.nproc, api.graceful_timeout, api.health) == (3, 10, "/healthz")
    assert api.socket_mode == 0o600
    assert php.nproc == 1 and php.command == ["/usr/bin/php-cgi"]
    assert php.socket == str(tmp_path / "run/php.sock")  # relative to the file
    assert php.pidfile and php.pidfile.endswith("php.pid")


@pytest.mark.parametrize(
    "text, fragments",
    [
        (
            "- name: a\n  socket: /s\n  app: x\n  nprocs: 2\n",
            ["server 'a'", "key 'nprocs'", "unknown key", ":4:"],
        ),
        (
            "- name: a\n  socket: /s\n  app: x\n  nproc: two\n",
            ["server 'a'", "key 'nproc'", "must be int", ":4:"],
        ),
        ("- name: a\n  socket: /s\n  app: x\n  nproc: 0\n", ["at least 1"]),
        ("- name: a\n  app: x\n", ["server 'a'", "key 'socket'", "missing required"]),
        ("- socket: /s\n  app: x\n", ["server '#1'", "key 'name'"]),
        ("- name: a\n  socket: /s\n", ["exactly one of app, scriptname or command"]),
        ("- name: a\n  socket: /s\n  app: x\n  command: [y]\n", ["exactly one"]),
        (
            "- name: a\n  socket: /s\n  app: x\n- name: a\n  socket: /t\n  app: x\n",
            ["duplicate name 'a'", ":4:"],
        ),
        (
            "- name: a\n  socket: /s\n  app: x\n- name: b\n  socket: /s\n  app: x\n",
            ["duplicate socket"],
        ),
        ("- name: a\n  socket: 'nonsense'\n  app: x\n", ["key 'socket'"]),
        ("- name: a\n  socket: /s\n  app: x\n  socket_mode: rwx\n", ["key 'socket_mode'"]),
        ("- name: a\n  socket: /s\n  app: x\n  nproc: true\n", ["must be int"]),
        ("- [1, 2\n", ["not valid YAML", ":2"]),
        ("", ["empty"]),
        ("servers: []\n", ["no servers"]),
        ("servers: [{name: a, socket: /s, app: x}]\nextra: 1\n", ["key 'extra'"]),
        ("defaults: {bogus: 1}\nservers: [{name: a, socket: /s, app: x}]\n", ["key 'bogus'"]),
        ("- name: a\n  socket: /s\n  app: x\n  health: healthz\n", ["key 'health'"]),
        # A mistyped key says what was meant.
        (
            "- name: a\n  socket: /s\n  app: x\n  nprocs: 3\n",
            [":4:", "server 'a'", "key 'nprocs'", "unknown key; did you mean 'nproc'?"],
        ),
        (
            "defaults: {graceful_timout: 3}\nservers: [{name: a, socket: /s, app: x}]\n",
            [":1:", "key 'graceful_timout'", "did you mean 'graceful_timeout'?"],
        ),
        (
            "default: {nproc: 3}\nservers: [{name: a, socket: /s, app: x}]\n",
            [":1:", "key 'default'", "did you mean 'defaults'?"],
        ),
    ],
)
def test_invalid_configs_are_refused_naming_file_server_key(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(path)
    for fragment in fragments:
        assert fragment in message, message


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "nope.yml"))


def test_parse_address_reads_unix_and_tcp_forms_and_refuses_others() -> None:
    assert parse_address("/run/a.sock") == UnixAddress("/run/a.sock")
    assert parse_address("unix:/run/a.sock") == UnixAddress("/run/a.sock")
    assert parse_address("127.0.0.1:9000") == TcpAddress("127.0.0.1", 9000)
    assert parse_address("[::1]:9000") == TcpAddress("::1", 9000)
    assert parse_address("localhost:1") == TcpAddress("localhost", 1)
    assert str(TcpAddress("::1", 9)) == "[::1]:9"
    for bad in ("", "host", "host:0", "host:99999", "::1:9000", "[::1]9000", "unix:"):
        with pytest.raises(AddressError):
            parse_address(bad)
    # A listener may ask for any free port; nothing else may name port 0.
    assert parse_address("127.0.0.1:0", any_port=True) == TcpAddress("127.0.0.1", 0)
    assert parse_address("[::1]:0", any_port=True) == TcpAddress("::1", 0)
    with pytest.raises(AddressError, match="from 0 to 65535"):
        parse_address("host:99999", any_port=True)


def test_parse_mode_reads_octal_however_written() -> None:
    assert parse_mode("0660") == 0o660 and parse_mode("600") == 0o600
    assert (
        parse_mode(0o640) == 0o640
        and parse_mode(660) == 0o660
        and parse_mode(600) == 0o600
        and parse_mode(0o660) == 0o660
    )
    with pytest.raises(ValueError):
        parse_mode("0999")


# ---------------------------------------------------------------- allowed_addrs


def server_with(tmp_path: Path, extra: str, defaults: str = "") -> str:
    head = f"defaults: {{{defaults}}}\nservers:\n" if defaults else "servers:\n"
    return write(tmp_path, head + "  - name: a\n    socket: 127.0.0.1:9000\n    app: x\n" + extra)


@pytest.mark.parametrize(
    "written, expected",
    [
        ("[10.0.0.5, 10.1.0.0/16]", ["10.0.0.5", "10.1.0.0/16"]),
        ('"10.0.0.5, ::1 ,fd00::/8"', ["10.0.0.5", "::1", "fd00::/8"]),
        ("any", ["any"]),
        ("ANY", ["any"]),
        ("[any]", ["any"]),
        ("['2001:db8::/32']", ["2001:db8::/32"]),
    ],
)
def test_allowed_addrs_list_string_or_any(
    tmp_path: Path, written: str, expected: list[str]
) -> None:
    [server] = load_config(server_with(tmp_path, f"    allowed_addrs: {written}\n"))
    assert server.allowed_addrs == expected


@pytest.mark.parametrize(
    "written, fragment",
    [
        ("[10.0.0.5, nginx.local]", "'nginx.local' is not an IP address"),
        ('"10.0.0.0/33"', "'10.0.0.0/33' is not an IP address"),
        ("[any, 10.0.0.5]", "either any or a list"),
        ("[]", "is empty"),
        ('""', "is empty"),
        ("[10]", "must be a list of IP addresses"),
        ("{a: 1}", "must be list or str, got mapping"),
    ],
)
def test_allowed_addrs_errors_name_file_server_key_line(
    tmp_path: Path, written: str, fragment: str
) -> None:
    path = server_with(tmp_path, f"    allowed_addrs: {written}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:5:"), message
    assert "server 'a'" in message and "key 'allowed_addrs'" in message
    assert fragment in message


def test_allowed_addrs_from_defaults_are_validated(tmp_path: Path) -> None:
    path = server_with(tmp_path, "", defaults="allowed_addrs: [bogus]")
    with pytest.raises(ConfigError, match="server 'a' key 'allowed_addrs'.*'bogus'"):
        load_config(path)


def test_allowed_addrs_resolve_config_then_env_then_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fcgi_engine.config.address import LOOPBACK
    from fcgi_engine.config.boot import for_server
    from fcgi_engine.config.settings import ServerConfig, resolve_allowed_addrs

    monkeypatch.delenv("FCGI_WEB_SERVER_ADDRS", raising=False)
    bare = ServerConfig(name="a", socket="127.0.0.1:9000", app="x")
    resolved = resolve_allowed_addrs(bare)
    assert (resolved.entries, resolved.source, resolved.any) == (list(LOOPBACK), "default", False)

    def gen_addrs(cfg: ServerConfig) -> list[str]:
        return for_server(
            cfg, 1, 1, listen_fd=3, channel_fd=4, handoff_send_fd=5, handoff_recv_fd=6
        ).allowed_addrs

    # The worker gets the loopback range, never an empty list that could mean "no check".
    assert gen_addrs(bare) == ["127.0.0.0/8", "::1"]
    monkeypatch.setenv("FCGI_WEB_SERVER_ADDRS", "10.0.0.5, 10.0.1.0/24,")
    assert gen_addrs(bare) == ["10.0.0.5", "10.0.1.0/24"]
    assert resolve_allowed_addrs(bare).source == "FCGI_WEB_SERVER_ADDRS"
    explicit = ServerConfig(name="a", socket="127.0.0.1:9000", app="x", allowed_addrs=["any"])
    assert gen_addrs(explicit) == ["any"] and resolve_allowed_addrs(explicit).any
    monkeypatch.setenv("FCGI_WEB_SERVER_ADDRS", "10.0.0.5,web1")
    with pytest.raises(AddressError, match=r"\$FCGI_WEB_SERVER_ADDRS: 'web1' is not an IP"):
        resolve_allowed_addrs(bare)
    assert gen_addrs(explicit) == ["any"]  # the config's own list wins over the environment


def test_parse_allowed_addrs_reads_a_comma_separated_string() -> None:
    from fcgi_engine.config.settings import parse_allowed_addrs

    assert parse_allowed_addrs("10.0.0.5,192.168.0.0/16") == ["10.0.0.5", "192.168.0.0/16"]
    assert parse_allowed_addrs(" any ") == ["any"]
    for bad in ("", ",", "any,10.0.0.1", "10.0.0.300"):
        with pytest.raises(AddressError):
            parse_allowed_addrs(bad)


# ---------------------------------------------------------------- user and group


def test_group_without_user_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "- name: a\n  socket: /s\n  app: x\n  group: www-data\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4:") and "server 'a' key 'group'" in message
    assert "group: needs user: (write user: root to keep root)" in message
    [server] = load_config(
        write(tmp_path, "- name: a\n  socket: /s\n  app: x\n  group: www-data\n  user: root\n")
    )
    assert (server.user, server.group) == ("root", "www-data")


def test_group_without_user_from_defaults_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path, "defaults: {group: www-data}\nservers:\n  - {name: a, socket: /s, app: x}\n"
    )
    with pytest.raises(ConfigError, match="server 'a' key 'group': group: needs user:"):
        load_config(path)


def test_an_unknown_key_like_no_known_one_gets_no_guess(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "- name: a\n  socket: /s\n  app: x\n  zzz: 1\n"))
    assert str(info.value).endswith("key 'zzz': unknown key")


def test_directory_problem_names_a_socket_in_a_missing_directory(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"- name: ok\n  socket: {tmp_path}/ok.sock\n  app: x\n  pidfile: {tmp_path}/new/ok.pid\n"
        f"- name: bad\n  app: x\n  pidfile: {tmp_path}/bad.pid\n"
        f"  socket: {tmp_path}/nowhere/bad.sock\n",
    )
    ok, bad = load_located(path)
    # A missing pidfile directory that can be created is created at start: no problem.
    assert directory_problem(ok) is None
    problem = directory_problem(bad)
    assert problem is not None
    assert str(problem).startswith(f"{path}:8: server 'bad' key 'socket': ")
    assert f"the socket's directory {tmp_path}/nowhere does not exist" in str(problem)
    assert list(directory_problems([ok, bad])) == ["bad"]


def test_directory_problem_names_a_pidfile_directory_that_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    path = write(
        tmp_path,
        f"- name: a\n  app: x\n  socket: 127.0.0.1:9000\n  pidfile: {tmp_path}/file/sub/a.pid\n",
    )
    [located] = load_located(path)
    problem = directory_problem(located)
    assert problem is not None
    assert f"{path}:4: server 'a' key 'pidfile'" in str(problem)
    assert f"cannot be created: {tmp_path}/file is not a directory" in str(problem)


# ---------------------------------------------------------------- allow-lists for networks


FLEET = ["198.18.0.0/15", "fd00::/8", "::ffff:203.0.113.7"]


@pytest.mark.parametrize(
    "peer, allowed",
    [
        ("198.18.0.1", True),
        ("198.19.255.255", True),  # the last address of the /15
        ("198.20.0.1", False),  # the first one past it
        ("198.17.255.255", False),
        ("::ffff:198.18.0.5", True),  # an IPv4 peer on a dual-stack socket
        ("::ffff:198.20.0.1", False),
        ("fd00::1", True),
        ("fdff:ffff::1", True),
        ("fe80::1", False),
        ("fe80::1%eth0", False),
        ("203.0.113.7", True),  # allowed as ::ffff:203.0.113.7: the same peer
        ("::ffff:203.0.113.7", True),
        ("203.0.113.8", False),
        ("127.0.0.1", False),  # loopback is not implied once a list is given
        ("not-an-address", False),
    ],
)
def test_allow_list_takes_cidr_ranges_ipv6_and_mapped_addresses(peer: str, allowed: bool) -> None:
    from fcgi_engine.config.address import AllowList

    assert AllowList(FLEET).allows(peer) is allowed


def test_a_mapped_range_is_the_ipv4_range_it_means() -> None:
    from fcgi_engine.config.address import AllowList

    mapped = AllowList(["::ffff:198.18.0.0/111"])  # /111 of the mapped space = /15 of IPv4
    assert mapped.allows("198.19.255.255") and mapped.allows("::ffff:198.18.3.4")
    assert not mapped.allows("198.20.0.1")


def test_allowed_addrs_of_a_fleet_load_from_yaml(tmp_path: Path) -> None:
    from fcgi_engine.config.address import AllowList

    written = "[198.18.0.0/15, 'fd00::/8', '::ffff:198.18.0.5']"
    [server] = load_config(server_with(tmp_path, f"    allowed_addrs: {written}\n"))
    assert server.allowed_addrs == ["198.18.0.0/15", "fd00::/8", "::ffff:198.18.0.5"]
    assert AllowList(server.allowed_addrs).allows("198.19.0.9")


@pytest.mark.parametrize(
    "socket, extra, env, warned",
    [
        ("198.18.1.2:9000", {}, None, True),
        ("0.0.0.0:9000", {}, None, True),  # every interface: a network listener
        ("[::]:9000", {}, None, True),
        ("app.example:9000", {}, None, True),  # a name: not known to be loopback
        ("127.0.0.1:9000", {}, None, False),
        ("[::1]:9000", {}, None, False),
        ("localhost:9000", {}, None, False),
        ("/run/app.sock", {}, None, False),
        ("198.18.1.2:9000", {"allowed_addrs": ["198.18.0.0/15"]}, None, False),
        ("198.18.1.2:9000", {"allowed_addrs": ["any"]}, None, False),
        ("198.18.1.2:9000", {}, "198.18.0.1", False),
        ("198.18.1.2:9000", {"command": ["php-cgi"], "app": None}, None, False),
    ],
)
def test_a_network_listener_without_an_allow_list_is_warned_about(
    monkeypatch: pytest.MonkeyPatch,
    socket: str,
    extra: dict[str, object],
    env: str | None,
    warned: bool,
) -> None:
    from fcgi_engine.config.settings import ServerConfig, loopback_only_warning

    if env is None:
        monkeypatch.delenv("FCGI_WEB_SERVER_ADDRS", raising=False)
    else:
        monkeypatch.setenv("FCGI_WEB_SERVER_ADDRS", env)
    cfg = ServerConfig(**{"name": "shop", "socket": socket, "app": "x", **extra})  # type: ignore[arg-type]
    text = loopback_only_warning(cfg)
    if not warned:
        assert text is None
        return
    assert text is not None
    assert text.startswith(f"shop: listens on {socket} but will accept loopback peers only")
    assert "allowed_addrs" in text and "$FCGI_WEB_SERVER_ADDRS" in text
