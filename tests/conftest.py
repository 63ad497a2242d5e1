"""Shared fixtures: real fcgi-engine processes and a real nginx, stopped by pid at teardown."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fcgi_engine import control

# How tests run the engine: this interpreter, this checkout.
ENGINE = [sys.executable, "-m", "fcgi_engine"]
ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"


def wait_for(
    condition: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> object:
    """Poll `condition` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
        except Exception as exc:  # noqa: BLE001 - polled conditions may fail until ready
            last_exc = exc
            result = None
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what}"
        + (f" (last error: {last_exc!r})" if last_exc else "")
    )


@contextmanager
def threads_running(
    target: Callable[[], object], count: int, stop: threading.Event | None = None
) -> Iterator[None]:
    """`count` threads run `target` during the block; after it, `stop` is set and they are
    joined (a target watches `stop` to end)."""
    threads = [threading.Thread(target=target) for _ in range(count)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        if stop is not None:
            stop.set()
        for t in threads:
            t.join(20)


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (Linux: /proc/PID/task/*/children)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return found


def worker_pids(master_pid: int) -> list[int]:
    """The worker processes under a master: its generations' children."""
    return [w for gen in child_pids(master_pid) for w in child_pids(gen)]


def can_connect(address: str) -> bool:
    try:
        if address.startswith("/"):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(address)
        else:
            host, port = address.rsplit(":", 1)
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
                pass
    except OSError:
        return False
    return True


def release_site(tmp: Path, code: str, extra: str = "") -> str:
    """Make tmp/site/current -> r1 holding app.py (`code`), as a deploy tool would; returns the
    config of a server `app` booted from it (`extra`: more keys, indented)."""
    site = tmp / "site"
    (site / "r1").mkdir(parents=True)
    (site / "r1" / "app.py").write_text(code)
    (site / "current").symlink_to(site / "r1")
    return f"""\
- name: app
  app: app.py
  chdir: "{site}/current"
  socket: "{tmp}/app.sock"
  pidfile: "{tmp}/app.pid"
{extra}"""


def deploy(site: Path, release: str, code: str) -> None:
    """Write a release and point `current` at it, as a deploy tool would."""
    (site / release).mkdir()
    (site / release / "app.py").write_text(code)
    (site / "current").unlink()
    (site / "current").symlink_to(site / release)


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    address: str
    pidfile: str
    log_path: str
    tag: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        kill_tagged(self.tag)
        try:
            # Reaped, whatever happened above: an unreaped child is a ResourceWarning later.
            return self.proc.wait(5)
        except subprocess.TimeoutExpired:
            return None

    def tree(self) -> list[int]:
        return tagged_pids(self.tag)

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        """The master's status snapshot, over its control socket."""
        reply = control.ask(self.pidfile + ".ctl", control.StatusRequest(), timeout=timeout)
        assert isinstance(reply, control.StatusResponse), reply
        return reply.status


def kill_tagged(tag: str) -> None:
    """Kill every process started under `tag` (generations run in their own sessions)."""
    for pid in tagged_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def tagged_pids(token: str) -> list[int]:
    tag = f"FCGI_TEST_TAG={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if tag in f.read().split(b"\0"):
                    if int(entry) != os.getpid():
                        found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    # Unix socket paths must stay short (108 bytes): use a short private directory.
    short = Path(tempfile.mkdtemp(prefix="fe-", dir="/tmp"))
    os.chmod(short, 0o755)
    yield short
    shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def serve(tmp: Path) -> Iterator[Callable[..., Server]]:
    """Start `fcgi-engine serve` and wait until it answers. A TCP `listen` on port 0 takes a
    free port: once the server answers, `address` is the one it bound (from its status)."""
    started: list[Server] = []

    def start(
        app: str = f"{APPS}/testapp.py",
        *args: str,
        listen: str | None = None,
        nproc: int = 2,
        wait: bool = True,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        wrap: list[str] | None = None,
    ) -> Server:
        address = listen or str(tmp / f"app{len(started)}.sock")
        pidfile = str(tmp / f"app{len(started)}.pid")
        log_path = str(tmp / f"app{len(started)}.log")
        cmd = [
            *(wrap or []),
            *ENGINE,
            "serve",
            app,
            "--listen",
            address,
            "--nproc",
            str(nproc),
            "--pidfile",
            pidfile,
            *args,
        ]
        tag = f"{os.getpid()}-{time.monotonic_ns()}"
        full_env = dict(os.environ, FCGI_TEST_TAG=tag, **(env or {}))
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=log, env=full_env, cwd=cwd, stdin=subprocess.DEVNULL
            )
        # Tag the tree so teardown finds every process of it, whatever its session.
        server = Server(proc, address, pidfile, log_path, tag)
        started.append(server)
        if wait:
            status = wait_for(lambda: _ready(server), 20, what=f"fcgi-engine on {address}")
            if address.endswith(":0"):
                server.address = status["listen"]  # type: ignore[index]
        return server

    yield start
    for server in started:
        server.stop()


def _ready(server: Server) -> dict[str, Any] | None:
    """The server's status once a generation serves, else None."""
    if server.proc.poll() is not None:
        raise AssertionError(f"fcgi-engine exited with {server.proc.returncode}:\n{server.log()}")
    if not os.path.exists(server.pidfile):
        return None
    status = server.status()
    return status if status.get("generation") else None


NGINX_CONF = """
daemon off;
master_process on;
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    fastcgi_temp_path {dir}/fastcgi;
    proxy_temp_path {dir}/proxy;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 200m;
    upstream app {{
        server {upstream};
        {keepalive}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            include {fastcgi_params};
            fastcgi_param SCRIPT_NAME "";
            fastcgi_param PATH_INFO $uri;
            fastcgi_pass app;
            fastcgi_keep_conn {keep_conn};
            fastcgi_request_buffering {buffering};
            fastcgi_buffering {buffering};
            fastcgi_read_timeout 60s;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


@dataclass
class Nginx:
    proc: subprocess.Popen[bytes]
    port: int
    dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def error_log(self) -> str:
        try:
            return (self.dir / "nginx-error.log").read_text(errors="replace")
        except OSError:
            return ""


@pytest.fixture
def nginx(tmp: Path) -> Iterator[Callable[..., Nginx]]:
    """Start a real nginx in front of an upstream; a machine without nginx fails the test."""
    binary = nginx_binary()
    if binary is None:
        pytest.fail("nginx is not installed: `bash .ci/run` installs it (apt-get install nginx)")
    started: list[Nginx] = []

    def start(
        upstream: str, keep_conn: bool = False, buffering: bool = True, pool: int = 32
    ) -> Nginx:
        ndir = tmp / f"nginx{len(started)}"
        ndir.mkdir()
        # Bound here on port 0 and handed over as an inherited socket ($NGINX, as in nginx's
        # own binary upgrade): the port is nginx's from the start, never free for a moment.
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(511)
        port = listener.getsockname()[1]
        target = f"unix:{upstream}" if upstream.startswith("/") else upstream
        params = "/etc/nginx/fastcgi_params"
        conf = NGINX_CONF.format(
            dir=ndir,
            port=port,
            upstream=target,
            keepalive=f"keepalive {pool};" if keep_conn else "",
            keep_conn="on" if keep_conn else "off",
            buffering="on" if buffering else "off",
            fastcgi_params=params,
            user="user root;" if os.geteuid() == 0 else "",
        )
        (ndir / "nginx.conf").write_text(conf)
        with listener, open(ndir / "stderr", "wb") as stderr:
            proc = subprocess.Popen(
                [binary, "-c", str(ndir / "nginx.conf"), "-p", str(ndir)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=dict(os.environ, NGINX=f"{listener.fileno()};"),
                pass_fds=[listener.fileno()],
            )
        server = Nginx(proc, port, ndir)
        started.append(server)
        # The socket listens already; nginx has taken its configuration once it writes its pid.
        wait_for(
            lambda: (ndir / "nginx.pid").exists() or proc.poll() is not None,
            10,
            what="nginx to start",
        )
        if proc.poll() is not None:
            raise AssertionError("nginx failed: " + (ndir / "stderr").read_text())
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGQUIT)
            try:
                server.proc.wait(10)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()


class Cli:
    """`fcgi-engine -c CONFIG ...`, with extra environment variables in `env`."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.tag = f"mgr-{os.getpid()}-{time.monotonic_ns()}"
        self.env: dict[str, str] = {}

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, FCGI_TEST_TAG=self.tag, **self.env)
        return subprocess.run(
            [*ENGINE, "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )


@pytest.fixture
def cli_for(tmp: Path) -> Iterator[Callable[[str], Cli]]:
    """`fcgi-engine -c CONFIG` for configs written from text; their servers stopped at teardown."""
    made: list[Cli] = []

    def make(text: str) -> Cli:
        path = tmp / f"config{len(made)}.yml"
        path.write_text(text)
        cli = Cli(path)
        made.append(cli)
        return cli

    yield make
    for cli in made:
        cli.env = {}
        cli("stop", "--fast", timeout=60)
        kill_tagged(cli.tag)
