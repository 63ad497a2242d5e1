"""systemd: sd_notify messages on a real NOTIFY_SOCKET datagram socket, in order, from a real
master; the rendered units checked by `systemd-analyze verify` and run under socket activation
(`systemd-socket-activate`, systemd's own tool); the `run NAME` verb the template unit uses."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fcgi_engine.client import request
from fcgi_engine.system import units
from fcgi_engine.system.notify import monotonic_usec
from tests.conftest import ENGINE, ROOT, Cli, Server, kill_tagged, wait_for

# The app reports the service manager's variables it sees: it must see none of them.
APP = """\
import json, os, time
time.sleep({delay})  # a slow import: READY=1 must wait for the proven generation
RELEASE = {release!r}
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json")])
    seen = {{k: os.environ.get(k) for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}}
    return [json.dumps({{"release": RELEASE, "seen": seen}}).encode()]
"""
BROKEN = "raise RuntimeError('broken release: no database')\n"
NO_VARIABLES = {"NOTIFY_SOCKET": None, "WATCHDOG_USEC": None, "WATCHDOG_PID": None}


class Manager:
    """Stands in for systemd: a bound datagram socket, read with deadlines."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.watchdogs: list[float] = []
        self.statuses: list[str] = []  # STATUS-only lines

    def receive(self, deadline: float) -> dict[str, str] | None:
        """One datagram by `deadline` (None: nothing came); pings and STATUS lines are noted."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536).decode()
        except TimeoutError:
            return None
        fields = dict(line.split("=", 1) for line in data.split("\n"))
        if fields == {"WATCHDOG": "1"}:
            self.watchdogs.append(time.monotonic())
        elif set(fields) == {"STATUS"}:
            self.statuses.append(fields["STATUS"])
        return fields

    def next(self, timeout: float = 20.0) -> dict[str, str]:
        """The next notification that is not a watchdog ping nor a lone STATUS line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.receive(deadline)
            if fields is not None and fields != {"WATCHDOG": "1"} and set(fields) != {"STATUS"}:
                return fields
        raise AssertionError(f"no notification within {timeout} s")

    def pings(self, count: int, timeout: float) -> list[float]:
        """Wait for `count` WATCHDOG=1 pings; their arrival times."""
        deadline = time.monotonic() + timeout
        while len(self.watchdogs) < count and time.monotonic() < deadline:
            self.receive(deadline)
        assert len(self.watchdogs) >= count, f"{len(self.watchdogs)} pings within {timeout} s"
        return self.watchdogs

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp: Path) -> Iterator[Manager]:
    m = Manager(tmp / "notify")
    yield m
    m.close()


def write_app(path: Path, release: str, delay: float = 0.0) -> None:
    path.write_text(APP.format(delay=delay, release=release))


def ask(address: str) -> dict[str, object]:
    response = request(address, "/", timeout=10)
    assert response.status == 200, response
    result: dict[str, object] = json.loads(response.body)
    return result


# ---------------------------------------------------------------- sd_notify from a real master


def test_notifications_follow_the_masters_life(
    tmp: Path, serve: Callable[..., Server], manager: Manager
) -> None:
    app = tmp / "app.py"
    write_app(app, "r1", delay=1.0)
    started = time.monotonic()
    server = serve(str(app), env={"NOTIFY_SOCKET": manager.path}, wait=False)

    ready = manager.next()
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(server.pid)
    # Not before the slow import, and only once generation 1 serves.
    assert time.monotonic() - started >= 1.0
    assert ready["STATUS"].startswith("generation 1: 2 workers")
    status = server.status()
    assert status["generation"] == 1 and status["workers_ready"] == 2
    assert ask(server.address) == {"release": "r1", "seen": NO_VARIABLES}

    # A rollout: RELOADING=1 (with our CLOCK_MONOTONIC) at its start, READY=1 at its end.
    write_app(app, "r2")
    before = monotonic_usec()
    os.kill(server.pid, signal.SIGHUP)
    reloading = manager.next()
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= monotonic_usec()
    assert reloading["STATUS"] == "rolling out generation 2"
    assert manager.next() == {"READY": "1", "STATUS": "rolled out to generation 2"}
    # READY=1 as generation 2 takes over; generation 1 stops accepting as it starts to drain.
    wait_for(lambda: ask(server.address)["release"] == "r2", 10, what="release r2")

    # A release that fails: rolled back, and systemd is told why.
    app.write_text(BROKEN)
    os.kill(server.pid, signal.SIGHUP)
    assert manager.next()["RELOADING"] == "1"
    back = manager.next()
    assert back["READY"] == "1"
    assert back["STATUS"].startswith("rolled back: ")
    assert "broken release: no database" in back["STATUS"]
    assert ask(server.address)["release"] == "r2"

    # USR2: a new image of the master, same pid; it still has NOTIFY_SOCKET and says so.
    os.kill(server.pid, signal.SIGUSR2)
    again = manager.next()
    assert again["READY"] == "1" and again["MAINPID"] == str(server.pid)
    assert again["STATUS"].startswith("master re-executed in place; generation 2")
    assert ask(server.address) == {"release": "r2", "seen": NO_VARIABLES}

    server.proc.send_signal(signal.SIGTERM)
    assert manager.next() == {"STOPPING": "1", "STATUS": "stopping"}
    assert server.proc.wait(30) == 0
    for line in manager.statuses:  # periodic lines, if any came, say what serves
        assert re.fullmatch(r"generation \d+: \d+ workers \(\d+ busy\), \d+ requests.*", line)


def test_watchdog_pings_and_the_app_never_sees_them(
    tmp: Path, serve: Callable[..., Server], manager: Manager
) -> None:
    app = tmp / "app.py"
    write_app(app, "r1")
    env = {"NOTIFY_SOCKET": manager.path, "WATCHDOG_USEC": "200000"}
    server = serve(str(app), env=env, wait=False)
    assert manager.next()["READY"] == "1"
    # Every 0.1 s (half of WATCHDOG_USEC), though the loop's own wake-up is 0.25 s.
    pings = manager.pings(10, timeout=5)
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    # On a quiet machine every gap is ~0.1 s; the bounds leave room for a loaded CI host while
    # still telling 0.1 s pings from the 0.25 s the loop would give unprompted.
    assert sum(gaps) / len(gaps) < 0.15 and max(gaps) < 0.5, gaps
    assert ask(server.address)["seen"] == NO_VARIABLES


def test_a_first_boot_that_fails_says_why_and_exits(
    tmp: Path, serve: Callable[..., Server], manager: Manager
) -> None:
    app = tmp / "app.py"
    app.write_text(BROKEN)
    server = serve(str(app), env={"NOTIFY_SOCKET": manager.path}, wait=False)
    stopping = manager.next()
    assert stopping["STOPPING"] == "1"
    assert stopping["STATUS"].startswith("failed to start: ")
    assert "broken release: no database" in stopping["STATUS"]
    assert server.proc.wait(30) == 1  # Restart=on-failure sees a failure


# ---------------------------------------------------------------- the template unit's `run NAME`


def test_run_is_the_configured_master_in_the_foreground(
    tmp: Path, cli_for: Callable[[str], Cli], manager: Manager
) -> None:
    app = tmp / "app.py"
    write_app(app, "r1")
    cli = cli_for(
        f"""\
- name: web
  app: {app}
  socket: {tmp}/web.sock
  pidfile: {tmp}/web.pid
  nproc: 2
"""
    )
    env = dict(os.environ, FCGI_TEST_TAG=cli.tag, NOTIFY_SOCKET=manager.path)
    log = open(tmp / "run.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [*ENGINE, "-c", str(cli.config), "run", "web"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    try:
        ready = manager.next()
        # The process systemd started is the master itself (exec, not a child or a daemon).
        assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid)
        assert ask(f"{tmp}/web.sock")["seen"] == NO_VARIABLES
        # Every verb trusts it as the configured master: the pidfile names it.
        status = cli("status", "web", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)[0]["pid"] == proc.pid
        again = cli("run", "web")
        assert again.returncode == 1 and "already running" in again.stderr
        rolled = cli("graceful", "web")
        assert rolled.returncode == 0, rolled.stderr
        assert manager.next()["RELOADING"] == "1"
        assert manager.next() == {"READY": "1", "STATUS": "rolled out to generation 2"}
        proc.send_signal(signal.SIGTERM)
        assert manager.next()["STOPPING"] == "1"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        kill_tagged(cli.tag)
        log.close()
    unknown = cli("run", "nope")
    assert unknown.returncode == 2 and "no server named 'nope'" in unknown.stderr


# ---------------------------------------------------------------- rendered units


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: `apt-get install systemd` (bash .ci/run does)")
    return found


def verify(*paths: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` offline (no systemd as PID 1 needed): units named by path are
    loaded with their directory, so a Requires= on a missing unit fails as well."""
    return subprocess.run(
        [analyze(), "verify", "--man=no", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def render(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ENGINE, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_verify_catches_a_broken_unit(tmp: Path) -> None:
    """The check below is meaningful here: verify really loads units in this container."""
    broken = tmp / "broken.service"
    broken.write_text("[Service]\nType=notify\nExecStart=/nonexistent/fcgi-engine run x\n")
    result = verify(broken)
    assert result.returncode != 0 and "/nonexistent/fcgi-engine" in result.stderr


def test_rendered_units_pass_systemd_analyze_verify(tmp: Path) -> None:
    one = tmp / "one"
    one.mkdir()
    app = tmp / "app.py"
    write_app(app, "r1")
    done = render("systemd", "--app", str(app), "--install", "--dir", str(one), "--",
                  "--nproc", "3", "--graceful-timeout", "50", cwd=tmp)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "systemctl daemon-reload && systemctl enable --now fcgi-engine-app.socket " in (
        done.stdout
    )
    service, socket_unit = one / "fcgi-engine-app.service", one / "fcgi-engine-app.socket"
    text = service.read_text()
    engine = units.engine_command()
    assert f"ExecStart={units.exec_line(engine)} serve {app} --nproc 3" in text
    assert "TimeoutStopSec=65s" in text  # graceful_timeout covered
    for line in ("Type=notify", "KillMode=mixed", "Restart=on-failure", "NotifyAccess=main"):
        assert line in text.splitlines()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "/usr/local/bin" not in text
    assert "ListenStream=/run/app.sock" in socket_unit.read_text()
    result = verify(service, socket_unit)
    assert result.returncode == 0 and result.stderr == "", result.stderr

    config = tmp / "fcgi-engine.yml"
    config.write_text(
        f"servers:\n  - {{name: web-1, app: {app}, socket: {tmp}/w.sock, graceful_timeout: 90}}"
        f"\n  - {{name: api.v2, app: {app}, socket: {tmp}/a.sock}}\n"
    )
    many = tmp / "many"
    many.mkdir()
    done = render("-c", str(config), "systemd", "--server", "web-1", "--install", "--dir",
                  str(many))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("systemctl enable --now fcgi-engine@web-1.service")
    template = many / "fcgi-engine@.service"
    text = template.read_text()
    assert f"ExecStart={units.exec_line(engine)} -c {config} run %i" in text
    assert "TimeoutStopSec=105s" in text  # the largest graceful_timeout of the file
    for name in ("web-1", "api.v2"):
        result = verify(many / f"fcgi-engine@{name}.service")
        assert result.returncode == 0 and result.stderr == "", result.stderr


def test_shipped_examples_pass_systemd_analyze_verify(tmp: Path) -> None:
    """examples/systemd name a virtualenv's fcgi-engine; with ours in its place, they verify."""
    example_dir = ROOT / "examples" / "systemd"
    shipped = sorted(p for p in example_dir.iterdir() if p.suffix in (".service", ".socket"))
    assert {p.name for p in shipped} >= {
        "fcgi-engine@.service",
        "fcgi-engine-myapp.service",
        "fcgi-engine-myapp.socket",
    }
    engine = units.exec_line(units.engine_command())
    for path in shipped:
        text = path.read_text()
        assert "/usr/local/bin" not in text
        (tmp / path.name).write_text(text.replace("/srv/myapp/venv/bin/fcgi-engine", engine))
    result = verify(
        tmp / "fcgi-engine-myapp.service",
        tmp / "fcgi-engine-myapp.socket",
        tmp / "fcgi-engine@web.service",
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_rendering_refuses_what_systemd_cannot_take(tmp: Path) -> None:
    app = tmp / "app.py"
    write_app(app, "r1")
    named = render("systemd", "--app", str(app), "--", "--listen", "localhost:9000")
    assert named.returncode == 2 and "not host names" in named.stderr
    daemon = render("systemd", "--app", str(app), "--", "--daemon")
    assert daemon.returncode == 2 and "foreground" in daemon.stderr
    config = tmp / "c.yml"
    config.write_text(f"- {{name: web, app: {app}, socket: {tmp}/w.sock}}\n")
    missing = render("-c", str(config), "systemd", "--server", "nope")
    assert missing.returncode == 2 and "no server 'nope'" in missing.stderr


def test_exec_quoting() -> None:
    assert units.exec_line(["/v/bin/fcgi-engine", "serve", "a:b"]) == "/v/bin/fcgi-engine serve a:b"
    assert units.exec_quote("50%") == '"50%%"'
    assert units.exec_quote("$HOME") == '"$$HOME"'
    assert units.exec_quote('a "b" c\\d') == '"a \\"b\\" c\\\\d"'
    assert units.exec_quote("create_app('x')") == "\"create_app('x')\""
    with pytest.raises(units.UnitError):
        units.exec_quote("two\nlines")


def test_install_never_writes_through_a_symlink(tmp: Path) -> None:
    target = tmp / "elsewhere"
    target.write_text("untouched")
    (tmp / "fcgi-engine@.service").symlink_to(target)
    rendered = units.Rendered((units.Unit("fcgi-engine@.service", "[Unit]\n"),), ())
    with pytest.raises(units.UnitError, match="symlink"):
        units.install(rendered, str(tmp))
    assert target.read_text() == "untouched"
    (tmp / "fcgi-engine@.service").unlink()
    old_umask = os.umask(0o077)
    try:
        (written,) = units.install(rendered, str(tmp))
    finally:
        os.umask(old_umask)
    assert Path(written).read_text() == "[Unit]\n"
    assert os.stat(written).st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp)) == ["elsewhere", "fcgi-engine@.service"]  # no temp left


# ---------------------------------------------------------------- socket activation


@contextmanager
def activated(argv: list[str], listen: str, env: dict[str, str], cwd: str) -> Iterator[int]:
    """systemd-socket-activate holding `listen`, which execs `argv` on the first connection."""
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.fail("systemd-socket-activate is missing: `apt-get install systemd`")
    setenv = [f"--setenv={k}={v}" for k, v in env.items()]
    proc = subprocess.Popen([tool, "--listen", listen, *setenv, *argv], cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        kill_tagged(env["FCGI_TEST_TAG"])


def test_the_rendered_service_serves_on_an_activated_socket(tmp: Path, manager: Manager) -> None:
    """The ExecStart the unit names, started the way systemd starts it: the first request waits
    in the socket's backlog until the first generation is ready, then it is answered."""
    app = tmp / "app.py"
    write_app(app, "r1", delay=0.5)
    out = tmp / "units"
    out.mkdir()
    flags = ["--listen", f"{tmp}/act.sock", "--pidfile", f"{tmp}/act.pid"]
    done = render("systemd", "--app", str(app), "--install", "--dir", str(out), "--", *flags,
                  cwd=tmp)  # fmt: skip
    assert done.returncode == 0, done.stderr
    service = (out / "fcgi-engine-app.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", service, re.M)
    listen = re.search(r"^ListenStream=(.*)$", (out / "fcgi-engine-app.socket").read_text(), re.M)
    workdir = re.search(r"^WorkingDirectory=(.*)$", service, re.M)
    assert exec_start and listen and workdir
    assert listen.group(1) == f"{tmp}/act.sock"
    argv = shlex.split(exec_start.group(1))  # no $ or % in it: shell words are systemd's here
    env = {"NOTIFY_SOCKET": manager.path, "FCGI_TEST_TAG": f"act-{os.getpid()}-{time.time_ns()}"}
    with activated(argv, listen.group(1), env, workdir.group(1)) as pid:
        wait_for(lambda: os.path.exists(listen.group(1)), 10, what="the activated socket")
        # This connection starts the service; it is answered once a generation is ready.
        assert ask(listen.group(1)) == {"release": "r1", "seen": NO_VARIABLES}
        ready = manager.next()
        assert ready["READY"] == "1" and ready["MAINPID"] == str(pid)
        os.kill(pid, signal.SIGHUP)
        assert manager.next()["RELOADING"] == "1"
        assert manager.next()["STATUS"] == "rolled out to generation 2"
        os.kill(pid, signal.SIGTERM)
        assert manager.next()["STOPPING"] == "1"
    # The socket is systemd's (here: the tool's): the master never removes it.
    assert not os.path.exists(f"{tmp}/act.pid")
