"""The manager through the CLI, as an init script or a deploy tool would call it."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fcgi_engine.client import request
from tests.conftest import APPS, ENGINE, Cli, deploy, release_site, threads_running, wait_for

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def seed(tmp: Path, extra: str = "") -> str:
    return f"""\
- name: "shop.server"
  nproc: 2
  scriptname: "{APPS}/testapp.py"
  pidfile: "{tmp}/shop.pid"
  socket: "{tmp}/shop.sock"
  additional_args: ["--flag"]
{extra}"""


def test_seed_yaml_server_starts_reports_rolls_out_restarts_and_stops(cli_for, tmp: Path) -> None:
    cli = cli_for(seed(tmp))
    r = cli("status")
    assert (r.returncode, r.stdout) == (3, "shop.server: not running\n")
    r = cli("start")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"shop\.server: started \(pid \d+, generation 1, 2 workers\)\n", r.stdout)
    pid = int((tmp / "shop.pid").read_text())
    assert request(str(tmp / "shop.sock"), "/hello").status == 200
    r = cli("status")
    assert r.returncode == 0 and f"running, pid {pid}, generation 1, workers 2/2" in r.stdout
    r = cli("start")
    assert r.returncode == 0 and "already running" in r.stdout
    assert int((tmp / "shop.pid").read_text()) == pid
    r = cli("graceful")
    assert r.returncode == 0 and "graceful ok, generation 1 -> 2, 2 workers" in r.stdout
    r = cli("reload", "shop.server")
    assert r.returncode == 0 and "generation 2 -> 3" in r.stdout
    r = cli("status", "--json")
    [data] = json.loads(r.stdout)
    assert data["pid"] == pid and data["generation"] == 3 and data["state"] == "running"
    r = cli("restart")
    assert r.returncode == 0 and "started" in r.stdout
    new_pid = int((tmp / "shop.pid").read_text())
    assert new_pid != pid
    r = cli("stop")
    assert r.returncode == 0 and re.search(r"stopped \(pid \d+", r.stdout)
    assert not (tmp / "shop.pid").exists() and not (tmp / "shop.sock").exists()
    r = cli("stop")
    assert (r.returncode, r.stdout) == (0, "shop.server: not running\n")
    # graceful on a stopped server starts it (exit 0, not "not running").
    r = cli("graceful")
    assert r.returncode == 0 and "was not running; started" in r.stdout


def test_broken_servers_fail_alone_and_the_worst_exit_code_wins(cli_for, tmp: Path) -> None:
    (tmp / "broken.py").write_text("raise RuntimeError('this release is broken')\n")
    cli = cli_for(
        seed(tmp)
        + f"""\
- name: broken
  app: "{tmp}/broken.py"
  socket: "{tmp}/broken.sock"
  pidfile: "{tmp}/broken.pid"
- name: missing
  app: "{tmp}/nope.py"
  socket: "{tmp}/missing.sock"
  pidfile: "{tmp}/missing.pid"
"""
    )
    r = cli("start")
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert lines["shop.server"].startswith("started")
    assert "this release is broken" in lines["broken"]
    assert "does not exist" in lines["missing"]
    assert r.returncode == 5  # the worst: a program not installed
    assert request(str(tmp / "shop.sock"), "/hello").status == 200
    r = cli("check")
    assert r.returncode == 5 and "shop.server: ok" in r.stdout
    r = cli("check", "shop.server")
    assert r.returncode == 0
    assert cli("status", "broken").returncode == 3
    assert cli("status", "nosuch").returncode == 2


def test_pidfile_of_a_live_unrelated_process_is_left_alone(cli_for, tmp: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (tmp / "shop.pid").write_text(f"{sleeper.pid}\n")
        cli = cli_for(seed(tmp))
        r = cli("status")
        assert r.returncode == 1 and "stale pidfile" in r.stdout
        r = cli("stop")
        assert r.returncode == 0 and "stale pidfile removed" in r.stdout
        assert sleeper.poll() is None  # never signalled
        (tmp / "shop.pid").write_text(f"{sleeper.pid}\n")
        r = cli("start")
        assert r.returncode == 0 and "stale pidfile removed" in r.stdout
        assert sleeper.poll() is None
        assert int((tmp / "shop.pid").read_text()) != sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()


def test_pidfile_of_a_dead_pid_is_stale_and_start_replaces_it(cli_for, tmp: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp / "shop.pid").write_text(f"{dead.pid}\n")
    cli = cli_for(seed(tmp))
    assert cli("status").returncode == 1
    r = cli("start")
    assert r.returncode == 0 and "stale pidfile removed" in r.stdout


def test_pidfile_symlink_is_refused_and_its_target_untouched(cli_for, tmp: Path) -> None:
    target = tmp / "victim"
    target.write_text("precious\n")
    os.symlink(target, tmp / "shop.pid")
    cli = cli_for(seed(tmp))
    r = cli("start")
    assert r.returncode != 0
    assert target.read_text() == "precious\n"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("- name: a\n  socket: /tmp/x.sock\n  app: x\n  bogus: 1\n", "key 'bogus'"),
        ("- name: a\n  socket: /tmp/x.sock\n  app: x\n  nproc: many\n", "key 'nproc'"),
        ("- name: a\n  app: x\n", "key 'socket'"),
        ("- [oops\n", "not valid YAML"),
    ],
)
def test_invalid_config_exit_6_without_traceback(cli_for, text: str, fragment: str) -> None:
    cli = cli_for(text)
    for verb in ("start", "status", "stop", "graceful", "check"):
        r = cli(verb)
        assert r.returncode == 6, (verb, r.stderr)
        assert fragment in r.stderr and str(cli.config) in r.stderr
        assert "Traceback" not in r.stderr


def engine(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`fcgi-engine ARGS`, with no -c but the test's own."""
    return subprocess.run(
        [*ENGINE, *args], capture_output=True, text=True, timeout=30, env=env, cwd=cwd
    )


def test_missing_config_is_exit_6(tmp: Path) -> None:
    r = engine("-c", str(tmp / "none.yml"), "status")
    assert r.returncode == 6 and "no such config file" in r.stderr


def test_config_from_environment_and_default_path(cli_for, tmp: Path) -> None:
    cli = cli_for(seed(tmp))
    r = engine("status", env=dict(os.environ, FCGI_ENGINE_CONFIG=str(cli.config)))
    assert r.returncode == 3 and "shop.server" in r.stdout
    (tmp / "fcgi-engine.yml").write_text(cli.config.read_text())
    r = engine("status", cwd=tmp)
    assert r.returncode == 3 and "shop.server" in r.stdout


def test_perl_command_server_rolled_out_under_load(cli_for, tmp: Path, nginx) -> None:
    cli = cli_for(f"""\
- name: perl
  nproc: 2
  command: ["{EXAMPLES}/perl/hello.fcgi"]
  socket: "{tmp}/perl.sock"
  pidfile: "{tmp}/perl.pid"
  environment: {{HELLO_VERSION: "p1"}}
""")
    r = cli("start")
    assert r.returncode == 0, r.stdout + r.stderr
    front = nginx(str(tmp / "perl.sock"), keep_conn=False)
    errors: list[str] = []
    ok = [0]
    stop = threading.Event()

    def load() -> None:
        for _ in range(100000):
            if stop.is_set():
                return
            conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
            try:
                conn.request("GET", "/x")
                resp = conn.getresponse()
                body = resp.read()
                if resp.status != 200 or not body.startswith(b"hello from perl"):
                    errors.append(f"{resp.status} {body[:80]!r}")
                else:
                    ok[0] += 1
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
            finally:
                conn.close()

    with threads_running(load, 4, stop):
        wait_for(lambda: ok[0] > 50, 10, what="load")
        for n in range(3):
            r = cli("graceful")
            assert r.returncode == 0, r.stdout + r.stderr
            assert f"generation {n + 1} -> {n + 2}" in r.stdout
            before = ok[0]
            wait_for(lambda b=before: ok[0] > b + 20, 10, what="requests after the rollout")
    assert not errors, (errors[:5], front.error_log()[-2000:])
    assert "upstream" not in front.error_log()


def test_start_boots_several_servers_in_parallel(cli_for, tmp: Path) -> None:
    slow = tmp / "slow.py"
    slow.write_text(
        "import time\ntime.sleep(1.5)\n"
        "def application(e, s):\n    s('200 OK', [])\n    return [b'ok']\n"
    )
    servers = "".join(
        f"""\
- name: s{i}
  app: "{slow}"
  nproc: 2
  socket: "{tmp}/s{i}.sock"
  pidfile: "{tmp}/s{i}.pid"
"""
        for i in range(4)
    )
    cli = cli_for(servers)
    started = time.monotonic()
    r = cli("start")
    took = time.monotonic() - started
    assert r.returncode == 0 and r.stdout.count("started") == 4
    # Four 1.5 s boots (plus a 1.5 s check each) in parallel, not one after another.
    assert took < 4 * 1.5 * 2


def test_init_script_actions_return_lsb_exit_codes(cli_for, tmp: Path) -> None:
    cli = cli_for(seed(tmp))
    env = dict(
        os.environ,
        FCGI_ENGINE=f"{sys.executable} -m fcgi_engine",
        FCGI_ENGINE_CONFIG=str(cli.config),
        FCGI_TEST_TAG=cli.tag,
    )
    wrapper = tmp / "fcgi-engine"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m fcgi_engine "$@"\n')
    wrapper.chmod(0o755)
    env["FCGI_ENGINE"] = str(wrapper)
    script = str(EXAMPLES / "init.d" / "fcgi-engine")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", script, *args], capture_output=True, text=True, timeout=120, env=env
        )

    assert run("status").returncode == 3
    assert run("start").returncode == 0
    assert run("status").returncode == 0
    r = run("reload")
    assert r.returncode == 0 and "graceful ok" in r.stdout
    assert run("stop").returncode == 0
    assert run("status").returncode == 3
    assert run("bogus").returncode == 2
    env["FCGI_ENGINE"] = str(tmp / "not-installed")
    assert run("start").returncode == 5


def gone(pid: int) -> bool:
    """The process has exited (a zombie included: its parent may not have reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except FileNotFoundError:
        return True


def start_release_r1(cli_for, tmp: Path) -> Cli:
    """A server `app` booted from site/current -> r1, which answers b"r1"."""
    cli = cli_for(
        release_site(tmp, "def application(e, s):\n    s('200 OK', [])\n    return [b'r1']\n")
    )
    assert cli("start").returncode == 0
    return cli


def test_graceful_to_a_broken_release_rolls_back_and_says_why(cli_for, tmp: Path) -> None:
    cli = start_release_r1(cli_for, tmp)
    deploy(tmp / "site", "r2", "import nonexistent_dependency_xyz\n")
    r = cli("graceful")
    assert r.returncode == 1
    assert "nonexistent_dependency_xyz" in r.stdout
    assert request(str(tmp / "app.sock"), "/").body == b"r1"


def test_a_killed_master_leaves_a_stale_pidfile_that_start_replaces(cli_for, tmp: Path) -> None:
    cli = cli_for(seed(tmp))
    assert cli("start").returncode == 0
    pid = int((tmp / "shop.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), 5, what="the master to die")
    r = cli("status")
    assert r.returncode == 1
    r = cli("start")
    assert r.returncode == 0 and "stale pidfile removed" in r.stdout


def test_restart_with_a_broken_release_leaves_the_server_running(cli_for, tmp: Path) -> None:
    cli = start_release_r1(cli_for, tmp)
    pid = int((tmp / "app.pid").read_text())
    deploy(tmp / "site", "r2", "raise ImportError('r2 cannot import')\n")
    r = cli("restart")
    assert r.returncode == 1 and "restart refused, nothing changed" in r.stdout
    assert int((tmp / "app.pid").read_text()) == pid
    assert request(str(tmp / "app.sock"), "/").body == b"r1"


def two_servers(tmp: Path) -> str:
    return "".join(
        f"""\
- name: s{i}
  app: "{APPS}/testapp.py"
  nproc: 1
  socket: "{tmp}/s{i}.sock"
  pidfile: "{tmp}/s{i}.pid"
"""
        for i in range(2)
    )


def test_stop_waits_for_in_flight_requests_of_all_servers_at_once(cli_for, tmp: Path) -> None:
    cli = cli_for(two_servers(tmp))
    assert cli("start").returncode == 0
    r = cli("status", "--json")
    assert [d["listen"] for d in json.loads(r.stdout)] == [f"{tmp}/s0.sock", f"{tmp}/s1.sock"]
    results: dict[int, bytes] = {}

    def slow(i: int) -> None:
        results[i] = request(f"{tmp}/s{i}.sock", "/slow?s=3", timeout=30).body

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()

    def both_busy() -> bool:
        data = json.loads(cli("status", "--json").stdout)
        return all(any(w["state"] == "busy" for w in d["workers"]) for d in data)

    try:
        wait_for(both_busy, 10, interval=0.1, what="a request in flight on each server")
        started = time.monotonic()
        r = cli("stop")
        took = time.monotonic() - started
    finally:
        for t in threads:
            t.join(30)
    # The master answers the stop once its requests are done and it has exited...
    assert r.returncode == 0 and r.stdout.count("stopped (pid") == 2, r.stdout
    assert results == {0: b"slept\n", 1: b"slept\n"}
    assert not any((tmp / f"s{i}.pid").exists() for i in range(2))
    # ...and both stop together: about one slow request, not two.
    assert took < 5.5, took


def test_stop_signals_a_master_whose_control_socket_is_gone(cli_for, tmp: Path) -> None:
    cli = cli_for(seed(tmp))
    assert cli("start").returncode == 0
    pid = int((tmp / "shop.pid").read_text())
    os.unlink(tmp / "shop.pid.ctl")
    assert cli("status").returncode == 4  # runs, but cannot be asked
    r = cli("stop")
    assert r.returncode == 0 and f"stopped (pid {pid}" in r.stdout, r.stdout
    assert gone(pid)
    assert not (tmp / "shop.pid").exists() and not (tmp / "shop.sock").exists()


CONTRACT = {
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

RELEASE = """\
def application(environ, start_response):
    status = "{health}" if environ["PATH_INFO"] == "/healthz" else "200 OK"
    start_response(status, [("Content-Type", "text/plain")])
    return [b"{name}"]
"""


def graceful_json(cli: Cli) -> tuple[int, dict]:
    r = cli("graceful", "app", "--json")
    [outcome] = json.loads(r.stdout)
    assert CONTRACT <= set(outcome), outcome
    assert outcome["server"] == outcome["name"] == "app"
    assert outcome["code"] == r.returncode
    return r.returncode, outcome


def test_graceful_json_is_the_documented_contract_for_every_outcome(cli_for, tmp: Path) -> None:
    site = tmp / "site"
    cli = cli_for(
        release_site(tmp, RELEASE.format(health="200 OK", name="r1"), "  health: /healthz\n")
    )
    # Not running: graceful starts it; there was no old generation.
    code, started = graceful_json(cli)
    assert (code, started["ok"], started["old_generation"], started["new_generation"]) == (
        0,
        True,
        None,
        1,
    )
    assert started["rolled_back"] is False and started["error"] is None

    deploy(site, "r2", RELEASE.format(health="200 OK", name="r2"))
    code, rolled = graceful_json(cli)
    assert code == 0 and rolled["ok"] is True and rolled["error"] is None
    assert (rolled["old_generation"], rolled["new_generation"]) == (1, 2)
    assert rolled["rolled_back"] is False
    # Filled by a master that reports them; null from one that does not (never wrong).
    assert rolled["release_dir"] in (None, os.path.realpath(site / "r2"))
    assert rolled["boot_seconds"] is None or 0 < rolled["boot_seconds"] < 30
    assert rolled["health"]["path"] == "/healthz"
    assert rolled["health"]["status"] in (None, 200)
    assert request(str(tmp / "app.sock"), "/").body == b"r2"

    # A release whose health check fails: rolled back, exit 1, the old generation serves.
    deploy(site, "r3", RELEASE.format(health="503 Service Unavailable", name="r3"))
    code, failed = graceful_json(cli)
    assert code == 1 and failed["ok"] is False and failed["rolled_back"] is True
    assert (failed["old_generation"], failed["new_generation"]) == (2, 3)
    assert failed["health"]["path"] == "/healthz"
    assert failed["health"]["status"] in (None, 503)
    assert isinstance(failed["error"], str) and failed["error"]
    assert failed["release_dir"] in (None, os.path.realpath(site / "r3"))
    assert request(str(tmp / "app.sock"), "/").body == b"r2"

    # A release that does not even import: refused before anything starts.
    deploy(site, "r4", "import nonexistent_dependency_xyz\n")
    code, refused = graceful_json(cli)
    assert code == 1 and refused["ok"] is False and refused["rolled_back"] is False
    assert (refused["old_generation"], refused["new_generation"]) == (2, None)
    assert "nonexistent_dependency_xyz" in refused["error"]
    assert request(str(tmp / "app.sock"), "/").body == b"r2"
