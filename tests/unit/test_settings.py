"""The settings table (config/settings.py) is the one source of the YAML keys, the `serve` flags
and `serve --help`, the README's key list, and what a generation is told (config/boot.py)."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from fcgi_engine.cli import UsageError, build_parser, serve_config
from fcgi_engine.config.boot import BootSpec, for_server
from fcgi_engine.config.loader import load_config
from fcgi_engine.config.settings import (
    SETTING_BY_KEY,
    SETTINGS,
    SETTINGS_BEGIN,
    SETTINGS_END,
    ServerConfig,
    Setting,
    settings_markdown,
)

README = Path(__file__).resolve().parents[2] / "README.md"
FLAGGED = [s for s in SETTINGS if s.flags]


def serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_every_setting_is_a_server_config_field_with_a_flag_or_a_reason() -> None:
    assert [s.key for s in SETTINGS] == [f.name for f in dataclasses.fields(ServerConfig)]
    for s in SETTINGS:
        assert s.help, s.key
        assert bool(s.flags) != bool(s.about.yaml_only), f"{s.key}: a flag, or why it has none"
    assert SETTING_BY_KEY["socket"].flags == ("--listen", "-l")
    assert {s.key for s in SETTINGS if not s.flags} == {
        "scriptname",
        "command",
        "additional_args",
        "environment",
    }


def test_serve_help_shows_every_flag_with_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    # argparse wraps (at spaces and hyphens): compare without white space.
    shown = re.sub(r"\s+", "", capsys.readouterr().out)
    for s in FLAGGED:
        for flag in (s.flag,) if s.positional else s.flags:
            assert flag in shown, flag
        assert re.sub(r"\s+", "", s.help) in shown, s.key
        default = s.shown_default()
        if default and not s.required:
            assert re.sub(r"\s+", "", f"(default {default})") in shown, s.key


def test_serve_defaults_are_the_yaml_defaults(tmp_path: Path) -> None:
    sock, pid = tmp_path / "a.sock", tmp_path / "a.pid"
    config = tmp_path / "fcgi-engine.yml"
    config.write_text(f"- name: a\n  app: x\n  socket: {sock}\n  pidfile: {pid}\n")
    [from_yaml] = load_config(str(config))
    from_flags = serve_config(serve_args("x", "--name", "a", "-l", str(sock), "-p", str(pid)))
    assert from_flags == from_yaml
    # Without --name and --listen: named after the app, serving on fd 0.
    bare = serve_config(serve_args("x"))
    assert (bare.name, bare.socket, bare.pidfile) == ("x", "fd:0", None)


def sample(s: Setting) -> tuple[str, Any]:
    """A valid non-default value for a flag, as typed and as ServerConfig holds it."""
    special: dict[str, tuple[str, Any]] = {
        "socket_mode": ("0600", 0o600),
        "allowed_addrs": ("10.0.0.1, 10.1.0.0/16", ["10.0.0.1", "10.1.0.0/16"]),
        "health": ("/up", "/up"),
        "status_path": ("/fcgi-status", "/fcgi-status"),
        "group": ("nogroup", "nogroup"),
    }
    if s.key in special:
        return special[s.key]
    if s.about.choices:
        return s.about.choices[-1], s.about.choices[-1]
    if float in s.kinds:
        return "12.5", 12.5
    if int in s.kinds:
        return "2048", 2048
    return "value", "value"


def test_every_flag_sets_its_setting() -> None:
    argv, expected = ["x"], {}
    for s in FLAGGED:
        if s.key != "app":
            typed, expected[s.key] = sample(s)
            argv += [s.flags[0], typed]
    cfg = serve_config(serve_args(*argv))
    for key, value in expected.items():
        if SETTING_BY_KEY[key].about.path:  # relative to the current directory
            value = str(Path(value).absolute())
        assert getattr(cfg, key) == value, key


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nproc", "0"], "--nproc: must be at least 1, got 0"),
        (["--boot-timeout", "0"], "--boot-timeout: must be at least 0.1"),
        (["--max-params-size", "10"], "--max-params-size: must be at least 1024"),
        (["--worker-connections", "0"], "--worker-connections: must be at least 1"),
        (["--socket-mode", "rwx"], "--socket-mode: 'rwx' is not an octal mode like 0660"),
        (["--allowed-addrs", "10.0.0.1,web"], "--allowed-addrs: 'web' is not an IP address"),
        (["--allowed-addrs", "any,10.0.0.1"], "--allowed-addrs: 'any' allows every peer"),
        (["--health", "up"], "--health: must be a path starting with /"),
        (["--group", "nogroup"], "--group needs --user (write --user root to keep root)"),
    ],
)
def test_serve_flags_are_checked_by_the_table(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        serve_config(serve_args("x", *argv))
    assert message in str(info.value)


def test_every_minimum_is_enforced_on_its_flag() -> None:
    for s in FLAGGED:
        if s.minimum is None:
            continue
        below = str(s.minimum - 1)
        with pytest.raises(UsageError, match=f"^{s.flag}: must be at least"):
            serve_config(serve_args("x", s.flag, below))


def readme_block() -> str:
    text = README.read_text()
    start, end = text.find(SETTINGS_BEGIN), text.find(SETTINGS_END)
    assert 0 <= start < end, "README.md lost the settings markers"
    return text[start : end + len(SETTINGS_END)] + "\n"


def test_readme_key_list_is_the_table() -> None:
    assert readme_block() == settings_markdown(), (
        "README.md's key list differs from config/settings.py: paste in the output of\n"
        "python3 -c 'from fcgi_engine.config.settings import settings_markdown as m; "
        'print(m(), end="")\''
    )
    # Names and defaults, row by row (what a reader of the README relies on).
    rows = [line.split(" | ") for line in readme_block().splitlines()[3:-1]]
    assert [(r[0].strip("|` "), r[1]) for r in rows] == [
        (s.key, s.shown_default()) for s in SETTINGS
    ]


def test_readme_limits_table_names_keys_with_their_defaults() -> None:
    text = README.read_text()
    section = text[text.index("## Limits and guarantees") :]
    section = section[: section.index("\n\n", section.index("| key |"))]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows
    for row in rows:
        keys_cell, default_cell = (cell.strip() for cell in row.strip("|").split("|")[:2])
        keys = re.findall(r"`(\w+)`", keys_cell)
        assert all(key in SETTING_BY_KEY for key in keys), keys
        assert default_cell == ", ".join(SETTING_BY_KEY[k].shown_default() for k in keys), row


def test_boot_spec_carries_every_setting_through_json() -> None:
    changed = {
        s.key: sample(s)[1]
        for s in SETTINGS
        if s.key not in ("name", "socket", "app", "scriptname", "command", "group")
    }
    cfg = ServerConfig(name="a", socket="127.0.0.1:9000", app="m:app", **changed)
    spec = for_server(cfg, 7, 3, listen_fd=3, channel_fd=4, handoff_send_fd=5, handoff_recv_fd=6)
    back = BootSpec.from_json(spec.to_json())
    assert back == spec and back.server == cfg
    assert (back.generation, back.nproc, back.app, back.command) == (7, 3, "m:app", [])
    assert back.allowed_addrs == ["10.0.0.1", "10.1.0.0/16"]


def test_boot_spec_of_a_command_server_runs_program_and_arguments() -> None:
    cfg = ServerConfig(
        name="php", socket="/run/php.sock", command=["/usr/bin/php-cgi"], additional_args=["-q"]
    )
    spec = for_server(cfg, 1, 2, listen_fd=3, channel_fd=4, handoff_send_fd=-1, handoff_recv_fd=-1)
    assert (spec.app, spec.command, spec.argv) == ("", ["/usr/bin/php-cgi", "-q"], ["-q"])
    with pytest.raises(ValueError, match="has no app and no command"):
        for_server(
            ServerConfig(name="x", socket="/s"),
            1,
            1,
            listen_fd=3,
            channel_fd=4,
            handoff_send_fd=-1,
            handoff_recv_fd=-1,
        )
