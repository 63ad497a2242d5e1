"""What the manager trusts, through the CLI: whom the app's import runs as, how long a check may
take, which directories and pidfiles are believed, and which TCP peers a server accepts.

Another user is simulated as root: files and directories chowned to `nobody`, processes started
with subprocess's user=. Those tests are skipped when not run as root.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fcgi_engine.client import ClientError, request
from fcgi_engine.system.pidfile import process_cmdline
from tests.conftest import APPS, ENGINE, Server, deploy, release_site, wait_for
from tests.integration.test_manager import seed

pytestmark = pytest.mark.integration

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="simulating another user needs root")

NOBODY = pwd.getpwnam("nobody")

HELLO = "def application(e, s):\n    s('200 OK', [])\n    return [b'hello']\n"


def python_for(user: str) -> str:
    """An interpreter `user` may run (ours may live in root's home); skip if there is none."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            ok = subprocess.run(
                [candidate, "-c", "import sys; sys.exit(sys.version_info < (3, 10))"],
                user=user,
                cwd="/",
                capture_output=True,
                timeout=30,
            )
        except OSError:
            continue
        if ok.returncode == 0:
            return candidate
    pytest.skip(f"no Python 3.10+ that user {user} may run")


def owned_by_nobody(path: Path, mode: int = 0o755) -> Path:
    path.mkdir()
    os.chmod(path, mode)
    os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    return path


def leftover_processes(fragment: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and any(fragment in part for part in process_cmdline(int(entry)) or []):
            found.append(int(entry))
    return found


# ---------------------------------------------------------------- 1. privilege


@as_root
def test_check_imports_the_app_as_the_configured_user(cli_for, tmp: Path) -> None:
    out = owned_by_nobody(tmp / "out", 0o700)  # only nobody (and root) may write here
    (tmp / "whoami.py").write_text(
        "import os\n"
        f"with open({str(out / 'id')!r}, 'w') as f:\n"
        "    ids = [os.geteuid(), os.getegid(), sorted(os.getgroups()), os.environ.get('HOME')]\n"
        "    f.write(repr(ids))\n" + HELLO
    )
    cli = cli_for(f"""\
- name: who
  app: "{tmp}/whoami.py"
  socket: "{tmp}/who.sock"
  pidfile: "{tmp}/who.pid"
  user: nobody
  python: "{python_for("nobody")}"
""")
    r = cli("check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout == f"who: ok, {tmp}/whoami.py imports as user nobody\n"
    groups = sorted(os.getgrouplist("nobody", NOBODY.pw_gid))
    assert (out / "id").read_text() == repr([NOBODY.pw_uid, NOBODY.pw_gid, groups, NOBODY.pw_dir])


@as_root
def test_check_fails_clearly_when_the_user_cannot_run_the_interpreter(cli_for, tmp: Path) -> None:
    python = tmp / "private" / "python"
    python.parent.mkdir(mode=0o700)
    python.symlink_to(sys.executable)
    cli = cli_for(f"""\
- name: who
  app: "{APPS}/testapp.py"
  socket: "{tmp}/who.sock"
  pidfile: "{tmp}/who.pid"
  user: nobody
  python: "{python}"
""")
    r = cli("check")
    assert r.returncode == 1
    assert f"cannot run {python} as user nobody: Permission denied; set python:" in r.stdout


def test_group_without_user_is_refused(cli_for, tmp: Path) -> None:
    cli = cli_for(seed(tmp, "  group: nogroup\n"))
    for verb in ("check", "start"):
        r = cli(verb)
        assert r.returncode == 6
        assert "key 'group': group: needs user: (write user: root to keep root)" in r.stderr
    r = subprocess.run(
        [*ENGINE, "serve", f"{APPS}/testapp.py", "--group", "nogroup"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "--group needs --user" in r.stderr


def test_unknown_user_fails_the_check(cli_for, tmp: Path) -> None:
    cli = cli_for(seed(tmp, "  user: no-such-user-xyz\n"))
    r = cli("check")
    assert r.returncode == 1 and "no such user 'no-such-user-xyz'" in r.stdout


# ---------------------------------------------------------------- 2. timeouts


def hanging_app(path: Path) -> Path:
    # It also forks a helper: the check must not leave either behind.
    path.write_text("import os, time\nos.fork()\ntime.sleep(300)\n" + HELLO)
    return path


def test_hanging_import_fails_the_check_at_boot_timeout(cli_for, tmp: Path) -> None:
    app = hanging_app(tmp / "hang.py")
    cli = cli_for(f"""\
- name: hang
  app: "{app}"
  socket: "{tmp}/hang.sock"
  pidfile: "{tmp}/hang.pid"
  boot_timeout: 2
""")
    for verb in ("check", "graceful"):  # graceful of a stopped server starts it: checked first
        started = time.monotonic()
        r = cli(verb, timeout=60)
        took = time.monotonic() - started
        assert r.returncode == 1, (verb, r.stdout, r.stderr)
        assert "importing the app took over 2 s (boot_timeout)" in r.stdout
        assert 2 <= took < 2 + 6, (verb, took)
        # Killed, helper included (a zombie awaiting init has no command line).
        wait_for(lambda: leftover_processes(str(app)) == [], 5, what="the check to be gone")
    assert not (tmp / "hang.pid").exists()


def test_graceful_to_a_hanging_release_fails_at_boot_timeout(cli_for, tmp: Path) -> None:
    cli = cli_for(release_site(tmp, HELLO, "  boot_timeout: 4\n"))
    r = cli("start")
    assert r.returncode == 0, r.stdout + r.stderr
    deploy(tmp / "site", "r2", hanging_app(tmp / "hang.py").read_text())
    started = time.monotonic()
    r = cli("graceful", timeout=60)
    took = time.monotonic() - started
    assert r.returncode == 1
    assert r.stdout == (
        "app: graceful refused, nothing changed: app check failed: importing the app took "
        "over 4 s (boot_timeout)\n"
    )
    assert 4 <= took < 4 + 6
    assert request(str(tmp / "app.sock"), "/").body == b"hello"


@as_root
def test_check_opens_the_logs_as_the_user(cli_for, tmp: Path) -> None:
    # Needs `python -m fcgi_engine.serving --check SPEC --log PATH` (the serving side).
    logs = tmp / "logs"  # root's, 0755: nobody cannot create files in it
    logs.mkdir(mode=0o755)
    mine = owned_by_nobody(tmp / "mine")
    config = f"""\
- name: who
  app: "{APPS}/testapp.py"
  socket: "{tmp}/who.sock"
  pidfile: "{tmp}/who.pid"
  user: nobody
  python: "{python_for("nobody")}"
"""
    cli = cli_for(config + f'  access_log: "{logs}/access.log"\n')
    r = cli("check")
    assert r.returncode == 1
    assert f"app check failed: cannot open log {logs}/access.log: Permission denied" in r.stdout
    cli = cli_for(config + f'  access_log: "{mine}/a.log"\n  error_log: "{logs}/error.log"\n')
    r = cli("check")
    assert r.returncode == 1 and f"cannot open log {logs}/error.log" in r.stdout
    cli = cli_for(config + f'  access_log: "{mine}/a.log"\n  error_log: "{mine}/e.log"\n')
    r = cli("check")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (mine / "a.log").stat().st_uid == NOBODY.pw_uid


# ---------------------------------------------------------------- 3. TCP peers


@pytest.mark.parametrize(
    "host, args, expected",
    [
        ("127.0.0.1", [], "INFO t: accepting TCP peers only from 127.0.0.0/8, ::1 (no allowed_a"),
        ("127.0.0.1", ["--allowed-addrs", "10.0.0.5,10.1.0.0/16"], "only from 10.0.0.5, 10.1"),
        ("0.0.0.0", ["--allowed-addrs", "any"], "WARNING t: any host that reaches 0.0.0.0:"),
        ("0.0.0.0", [], "WARNING t: listens on 0.0.0.0:"),
    ],
)
def test_master_says_which_tcp_peers_it_accepts(
    tmp: Path, host: str, args: list[str], expected: str
) -> None:
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*ENGINE, "serve", f"{APPS}/testapp.py", "--name", "t"]
            + ["--listen", f"{host}:0", *args],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for(lambda: expected in log.read_text(), 20, what=f"{expected!r} in the log")
        assert log.read_text().count("accepting TCP peers") == 1
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_tcp_listener_accepts_loopback_only_by_default(
    serve: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FCGI_WEB_SERVER_ADDRS", raising=False)
    default = serve(listen="127.0.0.1:0")
    assert request(default.address, "/hello").status == 200
    elsewhere = serve(f"{APPS}/testapp.py", "--allowed-addrs", "10.0.0.5", listen="127.0.0.1:0")
    with pytest.raises(ClientError):
        request(elsewhere.address, "/hello", timeout=5)


def test_serve_rejects_a_bad_allow_list(tmp: Path) -> None:
    r = subprocess.run(
        [*ENGINE, "serve", "x", "--allowed-addrs", "10.0.0.1,web"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "--allowed-addrs: 'web' is not an IP address" in r.stderr


def test_bad_web_server_addrs_fail_the_check(cli_for, tmp: Path) -> None:
    cli = cli_for(seed(tmp))
    r = cli("check")
    assert r.returncode == 0
    cli.env = {"FCGI_WEB_SERVER_ADDRS": "10.0.0.1,web"}
    r = cli("check")
    assert r.returncode == 1 and "$FCGI_WEB_SERVER_ADDRS: 'web' is not an IP address" in r.stdout


# ---------------------------------------------------------------- 4. shared directories


@as_root
@pytest.mark.parametrize("what", ["pidfile", "socket"])
def test_directory_writable_by_another_user_is_refused(cli_for, tmp: Path, what: str) -> None:
    shared = owned_by_nobody(tmp / "shared", 0o777)
    pidfile = shared / "shop.pid" if what == "pidfile" else tmp / "shop.pid"
    sock = shared / "shop.sock" if what == "socket" else tmp / "shop.sock"
    cli = cli_for(f"""\
- name: shop
  app: "{APPS}/testapp.py"
  pidfile: "{pidfile}"
  socket: "{sock}"
""")
    r = cli("start")
    assert r.returncode == 1
    if what == "pidfile":
        assert f"cannot trust the pidfile {pidfile}: {shared} belongs to nobody" in r.stdout
        r = cli("status")
        assert r.returncode == 4 and f"cannot trust the pidfile {pidfile}" in r.stdout
    else:
        assert f"refusing the socket directory: {shared} belongs to nobody" in r.stdout
    assert not pidfile.exists() and not sock.exists()
    # `serve` refuses it too.
    r = subprocess.run(
        [
            sys.executable,
            *("-m", "fcgi_engine", "serve", f"{APPS}/testapp.py"),
            *("--listen", str(sock), "--pidfile", str(pidfile)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert f"refusing the {what} directory: {shared} belongs to nobody" in r.stderr


def test_world_writable_directory_without_sticky_bit_is_refused(cli_for, tmp: Path) -> None:
    shared = tmp / "open"
    shared.mkdir()
    os.chmod(shared, 0o777)
    cli = cli_for(seed(tmp).replace(f"{tmp}/shop.pid", f"{shared}/shop.pid"))
    r = cli("start")
    assert r.returncode == 1
    assert f"{shared} is writable by every user and not sticky (mode 0777)" in r.stdout


def test_sticky_world_writable_directory_is_allowed(cli_for, tmp: Path) -> None:
    sticky = tmp / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp
    cli = cli_for(seed(tmp).replace(f"{tmp}/shop", f"{sticky}/shop"))
    r = cli("start")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (sticky / "shop.sock").lstat().st_uid == os.geteuid()
    assert cli("status").returncode == 0
    assert cli("stop").returncode == 0


@pytest.fixture
def fake_master(tmp: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process of `nobody` whose command line names fcgi-engine and tmp/shop.pid."""
    proc = subprocess.Popen(
        ["sh", "-c", "sleep 300; :", "fcgi-engine", "--pidfile", str(tmp / "shop.pid")],
        user="nobody",
    )
    try:
        wait_for(
            lambda: "fcgi-engine" in (process_cmdline(proc.pid) or []),
            5,
            what="the fake master to start",
        )
        yield proc
    finally:
        proc.kill()
        proc.wait()


@as_root
def test_pidfile_planted_by_another_user_is_not_trusted(
    cli_for, tmp: Path, fake_master: subprocess.Popen[bytes]
) -> None:
    pidfile = tmp / "shop.pid"
    pidfile.write_text(f"{fake_master.pid}\n")
    os.chown(pidfile, NOBODY.pw_uid, NOBODY.pw_gid)
    cli = cli_for(seed(tmp))
    reason = f"pidfile {pidfile} belongs to nobody (uid {NOBODY.pw_uid}), not to us or root"
    r = cli("status")
    assert r.returncode == 4 and f"cannot tell: {reason}" in r.stdout
    r = cli("stop")
    assert r.returncode == 1 and reason in r.stdout
    r = cli("start")
    assert r.returncode == 1 and reason in r.stdout
    assert fake_master.poll() is None  # never signalled
    assert pidfile.stat().st_uid == NOBODY.pw_uid  # nor its file touched


@as_root
def test_our_pidfile_naming_another_users_process_is_stale(
    cli_for, tmp: Path, fake_master: subprocess.Popen[bytes]
) -> None:
    # Root's pidfile, as after our master died and its pid was reused by another user's
    # process whose command line looks like our master's.
    (tmp / "shop.pid").write_text(f"{fake_master.pid}\n")
    cli = cli_for(seed(tmp))
    r = cli("status")
    assert r.returncode == 1 and f"stale pidfile names pid {fake_master.pid}" in r.stdout
    r = cli("stop")
    assert r.returncode == 0 and "stale pidfile removed" in r.stdout
    assert fake_master.poll() is None  # never signalled
