"""The command line without servers: help texts, `config`, the status line and `top`'s frames
from sample snapshots, and the reload watcher's file rules."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from fcgi_engine import reloader, top
from fcgi_engine.cli import build_parser, main
from fcgi_engine.config.loader import load_config
from fcgi_engine.manager import Code, Outcome, Probe, State, server_for_pidfile, status_of

# ---------------------------------------------------------------- help


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_top_level_help_lists_verbs_but_not_the_hidden_master(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    assert "SUPPRESS" not in shown
    assert not re.search(r"^\s+master\b", shown, re.M), shown
    for verb in ("serve", "request", "start", "status", "top", "config", "check"):
        assert f"\n    {verb} " in shown, verb


def test_every_option_of_every_visible_verb_has_help() -> None:
    parser = build_parser()
    missing = []
    for verb, sub in subparsers(parser).items():
        if verb == "master":
            continue
        for action in sub._actions:
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{verb} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_serve_flags_name_their_unit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    shown = capsys.readouterr().out
    for text in (
        "--boot-timeout SECONDS",
        "--max-body-size BYTES",
        "--body-min-rate BYTES/S",
        "--nproc N",
        "--interface {auto,wsgi,asgi}",
        "--reload",
    ):
        assert text in shown, text


# ---------------------------------------------------------------- config


def write_config(tmp_path: Path) -> Path:
    (tmp_path / "run").mkdir()
    path = tmp_path / "fcgi-engine.yml"
    path.write_text(
        "defaults: {nproc: 3, timeout: 20}\n"
        "servers:\n"
        "  - {name: api, app: 'api:app', socket: run/api.sock, pidfile: run/api.pid}\n"
        "  - name: shop\n"
        "    scriptname: shop/shop.wsgi\n"
        "    socket: 127.0.0.1:9002\n"
        "    pidfile: run/shop.pid\n"
        "    socket_mode: '0600'\n"
        "    environment: {A: b}\n"
    )
    return path


def test_config_prints_effective_settings_that_load_back_the_same(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    assert main(["-c", str(path), "config"]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    [api, shop] = data["servers"]
    # Defaults filled in, from the file's defaults and the table's.
    assert (api["nproc"], api["timeout"], api["boot_timeout"], api["threads"]) == (3, 20, 30, 1)
    assert api["socket"] == str(tmp_path / "run" / "api.sock")
    assert shop["socket_mode"] == "0600" and shop["chdir"] == str(tmp_path / "shop")
    again = tmp_path / "printed.yml"
    again.write_text(printed)
    assert load_config(str(again)) == load_config(str(path))


def test_config_selects_names_and_prints_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path)
    assert main(["-c", str(path), "config", "shop", "--json"]) == 0
    [shop] = json.loads(capsys.readouterr().out)
    assert shop["name"] == "shop" and shop["environment"] == {"A": "b"}
    assert main(["-c", str(path), "config", "nope"]) == Code.USAGE
    assert "unknown server 'nope'" in capsys.readouterr().err


# ---------------------------------------------------------------- status and top


def snapshot(**extra: Any) -> dict[str, Any]:
    """A status snapshot with every key of this version's master."""
    status: dict[str, Any] = {
        "name": "api",
        "pid": 100,
        "started_at": 1_700_000_000.0,
        "generation": 4,
        "booting": None,
        "nproc": 3,
        "requests": 7,
        "uptime": 125.0,
        "generations": [{"id": 4, "phase": "active", "age": 65.0}],
        "workers": [
            {
                "pid": 101,
                "state": "busy",
                "requests": 5,
                "started_at": 1_700_000_000.0,
                "request": {"method": "POST", "uri": "/upload?x=1", "running_for": 2.25},
            },
            {"pid": 102, "state": "idle", "requests": 2, "started_at": 1_700_000_060.0},
            {"pid": 103, "state": "draining", "requests": 0, "request": None},
        ],
        "metrics": {
            "requests": {"1xx": 0, "2xx": 90, "3xx": 0, "4xx": 8, "5xx": 2, "none": 0},
            "requests_per_second": 12.5,
            "in_flight": 1,
            "listen_queue": {"now": 3, "max": 18, "limit": 128},
            "restarts": {"crash": 1, "max_requests": 0, "timeout": 0, "memory": 0},
            "rollouts": {"rolled_out": 3, "rolled_back": 1},
        },
    }
    status.update(extra)
    return status


def running(status: dict[str, Any], name: str = "api") -> Outcome:
    server = server_for_pidfile("/run/x.pid")
    probe = Probe(State.RUNNING, status.get("pid", 100), status)
    outcome = status_of(server, probe)
    outcome.name = name
    return outcome


def test_status_line_shows_queue_rate_in_flight_and_classes() -> None:
    outcome = running(snapshot())
    assert outcome.code == Code.OK
    message = outcome.message
    assert "generation 4, workers 3/3 (1 busy)" in message
    assert "queue 3 (max 18, limit 128)" in message
    assert "12.5 req/s" in message
    assert "1 in flight" in message
    assert "2xx 90 4xx 8 5xx 2" in message and "1xx" not in message


def test_status_line_of_an_older_master_shows_what_it_has() -> None:
    old = snapshot()
    del old["metrics"]
    message = running(old).message
    assert message.endswith("up 2m05s, 7 requests")
    partial = snapshot(metrics={"listen_queue": {"now": None, "max": None, "limit": None}})
    assert "queue" not in running(partial).message


def test_a_pidfile_server_is_named_as_its_master_names_itself() -> None:
    server = server_for_pidfile("rel/app.pid")
    assert server.pidfile == os.path.abspath("rel/app.pid")
    assert server.control_path == server.pidfile + ".ctl"
    assert status_of(server, Probe(State.RUNNING, 5, {"name": "shop"})).name == "shop"
    stopped = status_of(server, Probe(State.STOPPED))
    assert (stopped.name, stopped.code) == (server.pidfile, Code.NOT_RUNNING_STATUS)


def test_top_frame_has_a_header_per_server_and_a_line_per_worker() -> None:
    stopped = Outcome("shop", Code.NOT_RUNNING_STATUS, "not running")
    views = [top.View(running(snapshot()), 10.0), top.View(stopped, 10.0)]
    frame = top.render(views, top.Rates(), wall_now=1_700_000_125.0)
    lines = frame.splitlines()
    head = lines[0]
    assert head.startswith("api: pid 100  generation 4 (up 1m05s)")
    assert "workers 3/3 (1 busy, 1 idle, 1 draining)" in head
    assert "queue 3 (max 18, limit 128)" in head
    assert "12.5 req/s" in head  # the master's own rate: no earlier frame to compare with
    assert "1 in flight" in head and "100 requests (2xx 90 4xx 8 5xx 2)" in head
    busy = next(line for line in lines if " 101 " in line)
    assert busy.split()[:5] == ["101", "busy", "5", "2m05s", "2.2s"]
    assert busy.endswith("POST /upload?x=1")
    idle = next(line for line in lines if " 102 " in line)
    assert idle.split() == ["102", "idle", "2", "1m05s", "-"]
    assert "shop: not running" in lines


def test_top_rate_is_the_delta_of_two_snapshots() -> None:
    rates = top.Rates()
    first = running(snapshot())
    top.render([top.View(first, 10.0)], rates, 0.0)
    later = snapshot()
    later["metrics"] = dict(later["metrics"], requests={"2xx": 150, "4xx": 10})  # +60 in 2 s
    frame = top.render([top.View(running(later), 12.0)], rates, 0.0)
    assert "30.0 req/s" in frame
    # The master's counters started over (it was restarted): no rate rather than a wrong one.
    restarted = snapshot(metrics={"requests": {"2xx": 1}})
    frame = top.render([top.View(running(restarted), 13.0)], rates, 0.0)
    assert "req/s" not in frame


def test_top_of_an_older_master_without_metrics() -> None:
    old = snapshot()
    del old["metrics"]
    for w in old["workers"]:
        w.pop("request", None)
        w.pop("started_at", None)
    rates = top.Rates()
    frame = top.render([top.View(running(old), 1.0)], rates, 0.0)
    assert "7 requests" in frame and "queue" not in frame and "req/s" not in frame
    old["requests"] = 9
    assert "2.0 req/s" in top.render([top.View(running(old), 2.0)], rates, 0.0)


def test_top_once_prints_one_frame_and_returns_the_worst_code() -> None:
    out = io.StringIO()
    calls = []

    def probe_all() -> list[Outcome]:
        calls.append(1)
        return [running(snapshot()), Outcome("shop", Code.NOT_RUNNING_STATUS, "not running")]

    assert top.run(probe_all, once=True, out=out, keys=io.StringIO()) == 3
    assert len(calls) == 1
    assert "\x1b[" not in out.getvalue()  # not a terminal: no screen clearing
    assert out.getvalue().startswith("api: pid 100")


# ---------------------------------------------------------------- reload watcher


def test_watcher_sees_sources_and_skips_caches_venvs_and_hidden_dirs(tmp_path: Path) -> None:
    for rel in (
        "app.py",
        "templates/page.html",
        "data/seed.json",
        "notes.txt",
        "static/logo.png",
        "__pycache__/app.cpython-311.pyc",
        ".git/hooks/x.py",
        "venv/lib/python3/site-packages/dep.py",
        "lib/site-packages/other.py",
        "node_modules/x/y.json",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / "venv" / "pyvenv.cfg").write_text("home = /usr\n")
    found = sorted(os.path.relpath(p, tmp_path) for p in reloader.source_files(str(tmp_path)))
    assert found == ["app.py", "data/seed.json", "notes.txt", "templates/page.html"]


def test_changed_names_added_removed_and_modified_files() -> None:
    before = {"a.py": (1, 10), "b.py": (1, 10), "c.py": (1, 10)}
    after = {"a.py": (1, 10), "b.py": (2, 10), "d.py": (1, 1)}
    assert reloader.changed(before, after) == ["b.py", "c.py", "d.py"]
    assert reloader.changed(before, dict(before)) == []


def test_watch_reloads_once_per_burst_of_changes(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("one")
    reloads: list[list[str]] = []
    # Each poll first asks alive(): the script edits files between polls, then ends it.
    script = [
        lambda: (tmp_path / "app.py").write_text("two, longer"),
        lambda: (tmp_path / "views.py").write_text("new"),  # the same burst
        lambda: None,  # quiet: the burst is reloaded, once
        lambda: None,
        lambda: (tmp_path / "views.py").unlink(),
        lambda: None,
    ]
    steps = iter(script)

    def alive() -> bool:
        step = next(steps, None)
        if step is None:
            return False
        step()
        return True

    reloader.watch(str(tmp_path), reloads.append, alive, interval=0.01)
    names = [[os.path.basename(f) for f in files] for files in reloads]
    assert names == [["app.py", "views.py"], ["views.py"]]


def test_watched_directory_is_chdir_else_the_app_file_else_cwd(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "app.py").write_text("")
    cwd = str(tmp_path)
    assert reloader.watched_directory("x:app", "/srv/r1", cwd) == "/srv/r1"
    assert reloader.watched_directory("site/app.py:app", None, cwd) == str(tmp_path / "site")
    assert reloader.watched_directory("mysite.wsgi", None, cwd) == cwd


def test_serve_refuses_reload_with_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "x", "--listen", "/tmp/x.sock", "--daemon", "--reload"]) == 2
    assert "--reload is for development" in capsys.readouterr().err


def test_serve_refuses_a_socket_in_a_missing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "x", "--listen", f"{tmp_path}/no/x.sock"]) == 2
    err = capsys.readouterr().err
    assert f"--listen: the socket's directory {tmp_path}/no does not exist" in err


# ---------------------------------------------------------------- readiness (status --ready)


def ready_outcome(status: dict[str, Any] | None, state: State = State.RUNNING) -> Outcome:
    from fcgi_engine.manager import ready_of

    server = server_for_pidfile("/run/x.pid")
    return ready_of(server, Probe(state, 100 if status is not None else None, status or {}))


def test_ready_when_the_master_says_so() -> None:
    outcome = ready_outcome(snapshot(ready=True))
    assert (outcome.code, outcome.message) == (Code.OK, "ready, generation 4")
    assert outcome.data["ready"] is True and outcome.data["ready_reason"] is None


def test_running_but_not_ready_is_exit_1_with_the_reason() -> None:
    draining = ready_outcome(
        snapshot(ready=False, state="stopping", drain_delay_until=1_700_000_200.0)
    )
    assert draining.code == Code.FAILURE
    assert draining.message.startswith("not ready: stopping (draining until ")
    said = ready_outcome(snapshot(ready=False, ready_reason="stopping: drain_delay 10 s"))
    assert said.message == "not ready: stopping: drain_delay 10 s"
    booting = ready_outcome(snapshot(ready=False, generation=None, booting=1, state="starting"))
    assert booting.message == "not ready: starting, generation 1 booting"
    assert booting.data["ready"] is False


def test_not_running_is_exit_3_and_unknown_exit_4() -> None:
    for state in (State.STOPPED, State.STALE):
        outcome = ready_outcome(None, state)
        assert outcome.code == Code.NOT_RUNNING_STATUS and outcome.data["ready"] is False
    assert ready_outcome(None, State.UNKNOWN).code == Code.UNKNOWN


def test_readiness_of_a_master_older_than_ready_is_judged_by_its_state() -> None:
    from fcgi_engine.manager import readiness

    old = snapshot(state="running")
    assert "ready" not in old and readiness(old).ready
    assert not readiness(snapshot(state="stopping")).ready
    assert not readiness(snapshot(state="starting", generation=None)).ready


def test_status_ready_and_start_wait_ready_flags_parse() -> None:
    args = build_parser().parse_args(["status", "api", "--ready", "--json"])
    assert (args.ready, args.json, args.names) == (True, True, ["api"])
    args = build_parser().parse_args(["status", "--pidfile", "x.pid", "--ready"])
    assert args.ready and args.pidfile == "x.pid"
    args = build_parser().parse_args(["start", "--wait-ready", "--wait-timeout", "2.5"])
    assert (args.wait_ready, args.wait_timeout) == (True, 2.5)


def test_wait_timeout_without_wait_ready_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yml"
    config.write_text(f"- name: a\n  app: x\n  socket: {tmp_path}/a.sock\n")
    assert main(["-c", str(config), "start", "--wait-timeout", "3"]) == Code.USAGE
    assert "--wait-timeout goes with --wait-ready" in capsys.readouterr().err
    assert main(["-c", str(config), "start", "--wait-ready", "--wait-timeout", "0"]) == Code.USAGE


# ---------------------------------------------------------------- graceful --json


CONTRACT_KEYS = {
    "server",
    "ok",
    "old_generation",
    "new_generation",
    "release_dir",
    "boot_seconds",
    "health",
    "rolled_back",
    "error",
}


def test_rollout_fields_are_all_there_null_where_unknown() -> None:
    from fcgi_engine.manager import rollout_fields

    fields = rollout_fields("api", ok=False, old_generation=3, error="boom")
    assert set(fields) == CONTRACT_KEYS
    assert fields["new_generation"] is None and fields["release_dir"] is None
    assert fields["rolled_back"] is False and fields["error"] == "boom"


def test_health_is_what_the_master_said_else_the_configured_path() -> None:
    from fcgi_engine.config.settings import ServerConfig
    from fcgi_engine.manager import _health_field

    checked = ServerConfig(name="a", socket="/x.sock", app="x", health="/healthz")
    unchecked = ServerConfig(name="a", socket="/x.sock", app="x")
    said = {"path": "/healthz", "status": 503}
    assert _health_field(checked, said) == said
    assert _health_field(checked, None) == {"path": "/healthz", "status": None}
    assert _health_field(unchecked, None) is None


def test_json_report_keeps_the_old_keys_and_adds_the_contract(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fcgi_engine.cli import _report
    from fcgi_engine.manager import rollout_fields

    failed = Outcome(
        "api",
        Code.FAILURE,
        "graceful rolled back, old generation still serving: health /healthz: 503",
        detail="health /healthz: 503",
        data={
            "from": 3,
            "to": 4,
            **rollout_fields(
                "api",
                ok=False,
                old_generation=3,
                new_generation=4,
                health={"path": "/healthz", "status": 503},
                rolled_back=True,
                error="health /healthz: 503",
            ),
        },
    )
    assert _report([failed], as_json=True) == Code.FAILURE
    [printed] = json.loads(capsys.readouterr().out)
    assert CONTRACT_KEYS | {"name", "code", "message", "detail"} <= set(printed)
    assert (printed["ok"], printed["rolled_back"], printed["code"]) == (False, True, 1)
    assert (printed["old_generation"], printed["new_generation"]) == (3, 4)
