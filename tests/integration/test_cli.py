"""The command line against real servers: `serve --reload`, `status`/`top` by pidfile, and the
check that refuses what `start` would fail on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

from fcgi_engine.client import request
from tests.conftest import ENGINE, child_pids, wait_for

APP = """\
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"{text}"]
"""


def engine(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ENGINE, *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )


def body(address: str) -> bytes:
    return request(address, "/", timeout=10).body


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_serve_reload_rolls_out_an_edited_app_and_the_watcher_ends_with_the_master(
    serve, tmp: Path
) -> None:
    dev = tmp / "dev"
    (dev / "__pycache__").mkdir(parents=True)
    app = dev / "app.py"
    app.write_text(APP.format(text="version one"))
    server = serve(str(app), "--reload", nproc=1)
    assert body(server.address) == b"version one"
    status = server.status()
    generation = status["generation"]
    # The watcher is the master's child that runs `serve` itself (generations run the engine's
    # serving module).
    [watcher] = [
        pid
        for pid in child_pids(server.pid)
        if "--reload" in Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    ]

    # Noise that is not source: no rollout for it.
    (dev / "__pycache__" / "app.cpython.pyc").write_text("x")
    (dev / "upload.bin").write_text("x")
    app.write_text(APP.format(text="version two"))
    wait_for(lambda: body(server.address) == b"version two", 20, what="the edited app served")
    assert server.status()["generation"] == generation + 1
    wait_for(lambda: "reload: app.py changed" in server.log(), 5, what="the reload note")
    assert "reload: watching " + str(dev) in server.log()

    # A broken save is rolled back: the last good code goes on serving; the next save serves.
    app.write_text("this is not python(")
    wait_for(lambda: "rolled back" in server.log() or "failed" in server.log(), 20)
    assert body(server.address) == b"version two"
    app.write_text(APP.format(text="version three"))
    wait_for(lambda: body(server.address) == b"version three", 20, what="the fixed app served")

    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    wait_for(lambda: gone(watcher), 10, what="the watcher to exit after its master")


def test_status_and_top_by_pidfile_without_a_config(serve, tmp: Path) -> None:
    server = serve(nproc=2)
    done = threading.Event()

    def slow() -> None:
        try:
            request(server.address, "/slow?s=2", timeout=15)
        finally:
            done.set()

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        busy = wait_for(
            lambda: [w for w in server.status()["workers"] if w["state"] == "busy"],
            10,
            what="a busy worker",
        )
        result = engine("status", "--pidfile", server.pidfile)
        assert result.returncode == 0, result.stderr
        line = result.stdout.strip()
        assert f": running, pid {server.pid}, generation 1, workers 2/2 (1 busy)" in line
        status = server.status()
        if "metrics" in status:  # this version's master
            assert "req/s" in line and "in flight" in line

        top = engine("top", "--pidfile", server.pidfile, "--once")
        assert top.returncode == 0, top.stderr
        frame = top.stdout
        assert "generation 1" in frame and "workers 2/2 (1 busy, 1 idle)" in frame
        [worker] = busy  # type: ignore[misc]
        line = next(x for x in frame.splitlines() if x.split()[:1] == [str(worker["pid"])])
        assert line.split()[1] == "busy"
        if "request" in worker:  # this version's master says what a worker runs
            assert line.endswith("GET /slow?s=2")
    finally:
        thread.join(20)
    assert done.is_set()

    as_json = engine("status", "--pidfile", server.pidfile, "--json")
    [entry] = json.loads(as_json.stdout)
    assert (entry["state"], entry["pid"], entry["code"]) == ("running", server.pid, 0)

    server.stop()
    stopped = engine("status", "--pidfile", server.pidfile)
    assert stopped.returncode == 3 and "not running" in stopped.stdout
    assert engine("top", "--pidfile", server.pidfile, "--once").returncode == 3
    assert engine("status", "--pidfile", server.pidfile, "app").returncode == 2


def test_check_and_start_refuse_a_socket_in_a_missing_directory(cli_for, tmp: Path) -> None:
    app = tmp / "app.py"
    app.write_text(APP.format(text="ok"))
    cli = cli_for(
        f"""\
- name: good
  app: {app}
  socket: {tmp}/good.sock
  pidfile: {tmp}/good.pid
- name: bad
  app: {app}
  pidfile: {tmp}/bad.pid
  socket: {tmp}/missing/bad.sock
"""
    )
    checked = cli("check")
    assert checked.returncode == 6, checked
    lines = checked.stdout.splitlines()
    assert lines[0].startswith("good: ok")
    assert lines[1].startswith(f"bad: not configured: {cli.config}:8: server 'bad' key 'socket'")
    assert f"{tmp}/missing does not exist" in lines[1]

    started = cli("start", "bad")
    assert started.returncode == 6 and not (tmp / "bad.pid").exists()
    started = cli("start")  # the good one starts all the same
    assert started.returncode == 6
    assert body(f"{tmp}/good.sock") == b"ok"
    (tmp / "missing").mkdir()
    assert cli("start", "bad").returncode == 0
    status = cli("status")
    assert status.returncode == 0, status.stdout


def test_top_and_config_of_the_yaml(cli_for, tmp: Path) -> None:
    app = tmp / "app.py"
    app.write_text(APP.format(text="ok"))
    cli = cli_for(
        f"- name: a\n  app: {app}\n  socket: {tmp}/a.sock\n  pidfile: {tmp}/a.pid\n  nproc: 1\n"
    )
    assert cli("start").returncode == 0
    frame = cli("top", "--once")
    assert frame.returncode == 0 and frame.stdout.startswith("a: pid ")
    assert "workers 1/1 (1 idle)" in frame.stdout
    printed = cli("config", "a")
    assert printed.returncode == 0 and f"socket: {tmp}/a.sock" in printed.stdout
    assert cli("top", "nope", "--once").returncode == 2


def test_status_ready_and_start_wait_ready(cli_for, tmp: Path) -> None:
    from tests.conftest import APPS

    cli = cli_for(
        f"- name: a\n  app: {APPS}/testapp.py\n  socket: {tmp}/a.sock\n"
        f"  pidfile: {tmp}/a.pid\n  nproc: 1\n  graceful_timeout: 20\n"
    )
    before = cli("status", "a", "--ready")
    assert before.returncode == 3 and before.stdout.startswith("a: not ready: not running")

    started = cli("start", "--wait-ready")
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("a: started (pid ") and started.stdout.strip().endswith(
        "ready"
    )
    ready = cli("status", "--ready")
    assert (ready.returncode, ready.stdout) == (0, "a: ready, generation 1\n")
    [entry] = json.loads(cli("status", "a", "--ready", "--json").stdout)
    assert (entry["ready"], entry["code"], entry["generation"]) == (True, 0, 1)
    again = cli("start", "--wait-ready")  # already running and ready: at once
    assert again.returncode == 0 and "already running" in again.stdout

    # A stop in progress (TERM, one request in flight): running, but not ready.
    pid = int((tmp / "a.pid").read_text())
    done = threading.Event()

    def slow() -> None:
        try:
            request(f"{tmp}/a.sock", "/slow?s=3", timeout=15)
        finally:
            done.set()

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        wait_for(
            lambda: "1 busy" in cli("status").stdout, 10, what="the slow request to be in flight"
        )
        os.kill(pid, signal.SIGTERM)
        stopping = wait_for(
            lambda: (r := cli("status", "--ready")).returncode == 1 and r,
            5,
            what="status --ready to say not ready",
        )
        assert stopping.stdout.startswith("a: not ready: stopping")  # type: ignore[union-attr]
    finally:
        thread.join(20)
    assert done.is_set()
    wait_for(lambda: gone(pid), 30, what="the master to exit")
    assert cli("status", "--ready").returncode == 3


def test_start_wait_ready_gives_up_after_wait_timeout_with_the_reason(cli_for, tmp: Path) -> None:
    app = tmp / "slowboot.py"
    # Imports slowly (the check and the generation both import it), then serves.
    app.write_text("import time\ntime.sleep(1.5)\n" + APP.format(text="late"))
    cli = cli_for(f"- name: s\n  app: {app}\n  socket: {tmp}/s.sock\n  pidfile: {tmp}/s.pid\n")
    r = cli("start", "s", "--wait-ready", "--wait-timeout", "0.3")
    assert r.returncode == 1
    assert r.stdout.startswith("s: not ready within 0.3 s: its first generation is still booting")
    # It goes on starting (not ready: status --ready says 1 while it boots, never 3 for long);
    # a longer wait sees it ready.
    wait_for(lambda: cli("status", "s").returncode == 0, 20, what="the master to come up")
    r = cli("start", "s", "--wait-ready", "--wait-timeout", "30")
    assert r.returncode == 0 and r.stdout.strip().endswith("ready"), r.stdout + r.stderr


def test_status_ready_by_pidfile(serve) -> None:
    server = serve(nproc=1)
    ready = engine("status", "--pidfile", server.pidfile, "--ready")
    assert ready.returncode == 0 and ": ready, generation 1" in ready.stdout
    server.stop()
    assert engine("status", "--pidfile", server.pidfile, "--ready").returncode == 3


def test_start_warns_once_about_a_network_listener_without_an_allow_list(
    cli_for, tmp: Path
) -> None:
    app = tmp / "app.py"
    app.write_text(APP.format(text="ok"))
    # Every interface (a config names a real port: one the kernel just gave out); loopback
    # peers are the ones accepted, as the warning says.
    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    cli = cli_for(f"- name: n\n  app: {app}\n  socket: 0.0.0.0:{port}\n  pidfile: {tmp}/n.pid\n")
    cli.env = {"FCGI_WEB_SERVER_ADDRS": ""}
    r = cli("start")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "warning:" in line]
    assert warnings == [
        f"fcgi-engine: warning: n: listens on 0.0.0.0:{port} but will accept loopback peers only "
        "(no allowed_addrs, no $FCGI_WEB_SERVER_ADDRS); to accept the web servers on other hosts, "
        "set allowed_addrs to their addresses or ranges (e.g. [198.18.0.0/15, 'fd00::/8'])"
    ]
    assert "warning" not in cli("status").stderr
