"""Several hosts on one machine, for the fleet tests: Linux network namespaces as hosts.

A `Fleet` makes a private network: a bridge (`br0`) in a namespace of its own, and one namespace
per node, each joined to the bridge by a veth pair (its end is `eth0` inside the node), loopback
up, addresses in 198.18.0.0/15 (the front 198.18.0.1, host N 198.18.0.1N), no default route. Every
name is unique to the fleet (`fe-<id>`, `h1-<id>`, ...), and the interface names live only inside
the fleet's namespaces, so parallel or leftover runs never collide; fixed ports are private too.

- A `Host` runs `fcgi-engine -c hN/fcgi-engine.yml start|graceful|stop|status` inside its
  namespace, as an orchestrator would over ssh: one server `app` on 198.18.0.1N:9000 (allow-list
  198.18.0.0/15, status listener on :9100), booted from `site/current -> releases/vN`.
- A `Front` is a real nginx in the front namespace with an upstream of hosts; `set_upstream`
  rewrites it and reloads nginx (HUP), returning once the old workers are gone.
- A `Load` is N HTTP clients in the front namespace (threads of the test process that `setns`
  into it): one connection to nginx per request, half POSTs whose body the app echoes a hash of,
  every reply recorded with the host and release that served it, bounded in count and time.
- `Fleet.close()` kills every process started under the fleet's tag (SIGKILL, found through
  /proc) and deletes its namespaces, which takes their veths with them: call it in a `finally`.
"""

from __future__ import annotations

import ctypes
import hashlib
import http.client
import itertools
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fcgi_engine import control
from tests.conftest import ENGINE, child_pids, kill_tagged, nginx_binary, tagged_pids, wait_for

NETWORK = "198.18.0.0/15"
PREFIX = 15
FRONT_ADDR = "198.18.0.1"
# A network outside the allow-list, on the same bridge: a namespace there must be refused.
OUTSIDE_PREFIX = 24
APP_PORT = 9000
STATUS_PORT = 9100
FRONT_PORT = 8080
CLONE_NEWNET = 0x40000000

_ids = itertools.count(1)
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def host_addr(index: int) -> str:
    return f"198.18.0.{10 + index}"


def ip(*args: str) -> None:
    """One `ip` command; a failure names it."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def enter_netns(name: str) -> None:
    """Move the calling thread (only it) into namespace `name`: its new sockets live there."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(name: str, fn: Callable[[], T], timeout: float = 60.0) -> T:
    """`fn()` called in a thread inside namespace `name`; its result, or its exception."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            enter_netns(name)
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"call in {name} still running after {timeout} s")
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return,unused-ignore]


APP_TEMPLATE = """\
import hashlib, os, time
time.sleep({import_sleep})
VERSION = {version!r}
HOST = os.environ.get("FE_HOST", "?")


def application(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/healthz":
        start_response({health_status!r}, [("Content-Type", "text/plain")])
        return [b"health"]
    if path.startswith("/slow/"):
        time.sleep(float(path.split("/")[2]))
    body = environ["wsgi.input"].read()
    out = f"{{HOST}} {{VERSION}} {{hashlib.sha256(body).hexdigest()}}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]
"""


@dataclass
class Host:
    """One host: a namespace with one fcgi-engine server `app`, driven by its YAML."""

    fleet: Fleet
    index: int
    netns: str
    dir: Path
    settings: dict[str, Any]

    @property
    def name(self) -> str:
        return f"h{self.index}"

    @property
    def addr(self) -> str:
        return host_addr(self.index)

    @property
    def address(self) -> str:
        return f"{self.addr}:{APP_PORT}"

    @property
    def status_address(self) -> str:
        return f"{self.addr}:{STATUS_PORT}"

    @property
    def config(self) -> Path:
        return self.dir / "fcgi-engine.yml"

    @property
    def pidfile(self) -> Path:
        return self.dir / "app.pid"

    @property
    def site(self) -> Path:
        return self.dir / "site"

    def release(
        self, version: str, *, health_status: str = "200 OK", import_sleep: float = 0.2
    ) -> Path:
        """Write releases/VERSION (not yet current); returns its directory."""
        release = self.site / "releases" / version
        release.mkdir(parents=True)
        (release / "app.py").write_text(
            APP_TEMPLATE.format(
                version=version, health_status=health_status, import_sleep=import_sleep
            )
        )
        return release

    def switch(self, release: Path) -> None:
        """Point site/current at `release` atomically, as a deploy tool does."""
        link = self.site / "current.tmp"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(release)
        os.replace(link, self.site / "current")

    def deploy(self, version: str, **kwargs: Any) -> Path:
        release = self.release(version, **kwargs)
        self.switch(release)
        return release

    def write_config(self) -> None:
        lines = ["servers:", "  - name: app"]
        lines += [f"    {key}: {json.dumps(value)}" for key, value in self.settings.items()]
        self.config.write_text("\n".join(lines) + "\n")

    def cli(self, *args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
        """`fcgi-engine -c CONFIG ARGS` run inside the host's namespace."""
        self.write_config()
        return self.fleet.run(self.netns, [*ENGINE, "-c", str(self.config), *args], timeout)

    def start(self) -> None:
        done = self.cli("start")
        assert done.returncode == 0, f"{self.name} start: {done.stdout}{done.stderr}"
        wait_for(lambda: self.status().get("generation"), 20, what=f"{self.name} serving")

    def graceful(self) -> tuple[int, dict[str, Any]]:
        """`graceful app --json`: the exit code and the server's JSON object."""
        done = self.cli("graceful", "app", "--json", timeout=120)
        try:
            outcome = json.loads(done.stdout)
        except ValueError as exc:
            output = done.stdout + done.stderr
            raise AssertionError(f"{self.name} graceful --json: {output}") from exc
        assert isinstance(outcome, list) and len(outcome) == 1, outcome
        return done.returncode, outcome[0]

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        """The master's status snapshot, over its control socket (a path: any namespace)."""
        reply = control.ask(str(self.pidfile) + ".ctl", control.StatusRequest(), timeout=timeout)
        assert isinstance(reply, control.StatusResponse), reply
        return reply.status

    def master_pid(self) -> int:
        return int(self.pidfile.read_text().split()[0])

    def log(self) -> str:
        try:
            return (self.dir / "error.log").read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class Reply:
    """One request of a `Load`, as the client saw it."""

    started: float
    ended: float
    method: str
    status: int | None
    host: str = ""
    version: str = ""
    upstream: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


class Load:
    """`clients` HTTP clients in the front namespace, through nginx, until stopped or
    `max_seconds` (or `max_requests` each) have passed; every reply checked and recorded."""

    def __init__(
        self,
        netns: str,
        clients: int = 8,
        max_seconds: float = 60.0,
        path: str = "/r",
        max_requests: int = 20000,
    ) -> None:
        self.netns = netns
        self.path = path
        self.max_requests = max_requests
        self.replies: list[Reply] = []
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.deadline = time.monotonic() + max_seconds
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(clients)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stop_flag.set()
        for thread in self.threads:
            thread.join(60)

    @property
    def ok(self) -> list[Reply]:
        with self.lock:
            return [r for r in self.replies if r.ok]

    @property
    def failed(self) -> list[Reply]:
        with self.lock:
            return [r for r in self.replies if not r.ok]

    def count_ok(self) -> int:
        return len(self.ok)

    def wait_ok(self, more: int, timeout: float = 20.0) -> None:
        """Wait until `more` requests past the present have succeeded."""
        target = self.count_ok() + more
        wait_for(lambda: self.count_ok() >= target, timeout, what=f"{more} more replies")

    def client(self, i: int) -> None:
        enter_netns(self.netns)
        n = 0
        while not self.stop_flag.is_set() and time.monotonic() < self.deadline:
            n += 1
            if n > self.max_requests:
                break
            body = (f"client {i} request {n} " * (1 + n % 40)).encode() if n % 2 else b""
            self.replies_append(self.one(f"{self.path}/{i}/{n}", body))

    def replies_append(self, reply: Reply) -> None:
        with self.lock:
            self.replies.append(reply)

    def one(self, path: str, body: bytes) -> Reply:
        method = "POST" if body else "GET"
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", FRONT_PORT, timeout=30)
        try:
            conn.request(method, path, body=body or None, headers={"Connection": "close"})
            response = conn.getresponse()
            data = response.read()
        except Exception as exc:  # noqa: BLE001 - every failure counts
            return Reply(started, time.monotonic(), method, None, error=repr(exc))
        finally:
            conn.close()
        ended = time.monotonic()
        upstream = response.getheader("X-Upstream") or ""
        host, version, digest = (data.decode(errors="replace").split(" ", 2) + ["", ""])[:3]
        reply = Reply(started, ended, method, response.status, host, version, upstream)
        if response.status != 200 or digest != hashlib.sha256(body).hexdigest():
            reply.error = f"{response.status} {data[:200]!r}"
        return reply


NGINX_CONF = """
daemon off;
master_process on;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    fastcgi_temp_path {dir}/fastcgi;
    proxy_temp_path {dir}/proxy;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream app {{
{servers}
        {keepalive}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_NAME "";
            fastcgi_param PATH_INFO $uri;
            fastcgi_pass app;
            fastcgi_keep_conn {keep_conn};
            fastcgi_next_upstream {next_upstream};
            fastcgi_connect_timeout 1s;
            fastcgi_read_timeout {read_timeout}s;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"""


@dataclass
class Front:
    """A real nginx in the front namespace, its upstream the hosts it was given."""

    fleet: Fleet
    proc: subprocess.Popen[bytes] | None
    dir: Path
    keep_conn: bool
    next_upstream: str
    read_timeout: float
    hosts: list[Host] = field(default_factory=list)

    def conf(self, hosts: Sequence[Host]) -> str:
        return NGINX_CONF.format(
            dir=self.dir,
            port=FRONT_PORT,
            servers="\n".join(f"        server {h.address};" for h in hosts),
            keepalive="keepalive 16;" if self.keep_conn else "",
            keep_conn="on" if self.keep_conn else "off",
            next_upstream=self.next_upstream,
            read_timeout=self.read_timeout,
        )

    @property
    def master(self) -> subprocess.Popen[bytes]:
        assert self.proc is not None
        return self.proc

    def workers(self) -> set[int]:
        return set(child_pids(self.master.pid))

    def set_upstream(self, hosts: Sequence[Host]) -> None:
        """Rewrite the upstream and reload nginx; returns once only new workers remain."""
        self.hosts = list(hosts)
        (self.dir / "nginx.conf").write_text(self.conf(hosts))
        old = self.workers()
        self.master.send_signal(signal.SIGHUP)
        wait_for(
            lambda: self.workers() and not (self.workers() & old),
            20,
            what="nginx to reload",
        )

    def error_log(self) -> str:
        try:
            return (self.dir / "error.log").read_text(errors="replace")
        except OSError:
            return ""


class Fleet:
    """Namespaces, a bridge, hosts and a front; `close()` removes all of it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.id = f"{os.getpid() % 100000}-{next(_ids)}"
        self.tag = f"fleet-{self.id}-{time.monotonic_ns()}"
        self.namespaces: list[str] = []
        self.inodes: list[int] = []  # of the namespaces: to find any process left in one
        self.hosts: list[Host] = []
        self.fronts: list[Front] = []
        self.bridge = self._namespace("br")
        ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge, "link", "set", "br0", "up")
        self.front = self.add_node("fe", [f"{FRONT_ADDR}/{PREFIX}"])

    def _namespace(self, role: str) -> str:
        name = f"{role}-{self.id}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        self.inodes.append(os.stat(f"/run/netns/{name}").st_ino)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def add_node(self, role: str, addrs: Sequence[str]) -> str:
        """A namespace on the bridge with `addrs` (CIDR notation) on its eth0."""
        name = self._namespace(role)
        port = f"p-{role}"
        ip("-n", self.bridge, "link", "add", port, "type", "veth", "peer", "name", "eth0",
           "netns", name)  # fmt: skip
        ip("-n", self.bridge, "link", "set", port, "master", "br0", "up")
        for addr in addrs:
            ip("-n", name, "addr", "add", addr, "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")
        return name

    def add_host(self, extra_addrs: Sequence[str] = (), **settings: Any) -> Host:
        """A host namespace with release v1 current and its YAML (not started); `settings`
        override the defaults below (a value of None drops the key)."""
        index = len(self.hosts) + 1
        netns = self.add_node(f"h{index}", [f"{host_addr(index)}/{PREFIX}", *extra_addrs])
        hdir = self.root / f"h{index}"
        hdir.mkdir()
        host = Host(self, index, netns, hdir, {})
        defaults: dict[str, Any] = {
            "app": "app.py",
            "chdir": str(host.site / "current"),
            "socket": host.address,
            "pidfile": str(host.pidfile),
            "error_log": str(hdir / "error.log"),
            "nproc": 2,
            "health": "/healthz",
            "allowed_addrs": NETWORK,
            "status_listen": host.status_address,
            "graceful_timeout": 20,
            "boot_timeout": 20,
            "environment": {"FE_HOST": host.name},
        }
        defaults.update(settings)
        host.settings = {k: v for k, v in defaults.items() if v is not None}
        host.deploy("v1")
        self.hosts.append(host)
        return host

    def start_hosts(self, hosts: Sequence[Host]) -> None:
        """Start hosts in parallel (each `start` waits for its own)."""
        errors: list[BaseException] = []

        def start(host: Host) -> None:
            try:
                host.start()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(h,)) for h in hosts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        if errors:
            raise errors[0]

    def env(self) -> dict[str, str]:
        return dict(os.environ, FCGI_TEST_TAG=self.tag)

    def run(
        self, netns: str, argv: Sequence[str], timeout: float = 90.0
    ) -> subprocess.CompletedProcess[str]:
        """`argv` run to its end inside `netns`, tagged for teardown."""
        return subprocess.run(
            ["ip", "netns", "exec", netns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            stdin=subprocess.DEVNULL,
        )

    def start_front(
        self,
        hosts: Sequence[Host],
        keep_conn: bool = False,
        next_upstream: str = "error timeout",
        read_timeout: float = 30,
    ) -> Front:
        binary = nginx_binary()
        if binary is None:
            raise AssertionError("nginx is not installed: `bash .ci/run` installs it")
        ndir = self.root / f"nginx{len(self.fronts)}"
        ndir.mkdir()
        front = Front(self, None, ndir, keep_conn, next_upstream, read_timeout, list(hosts))
        (ndir / "nginx.conf").write_text(front.conf(hosts))
        with open(ndir / "stderr", "wb") as stderr:
            # `ip netns exec` execs nginx: this pid is nginx's master.
            front.proc = proc = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.front,
                    binary,
                    "-c",
                    str(ndir / "nginx.conf"),
                    "-p",
                    str(ndir),
                ],  # fmt: skip
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=self.env(),
                stdin=subprocess.DEVNULL,
            )
        self.fronts.append(front)
        wait_for(
            lambda: (ndir / "nginx.pid").exists() and front.workers() or proc.poll() is not None,
            10,
            what="nginx to start",
        )
        if proc.poll() is not None:
            raise AssertionError("nginx failed: " + (ndir / "stderr").read_text())
        return front

    def close(self) -> None:
        """Kill every process of the fleet and delete its namespaces (and so their veths)."""
        for front in self.fronts:
            if front.proc is not None:
                # nginx rewrites its environ (its process titles), so the tag cannot find its
                # workers, and they outlive a killed master: kill them by pid, master first.
                workers = front.workers()
                if front.proc.poll() is None:
                    front.proc.kill()
                for pid in workers:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    front.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        kill_tagged(self.tag)
        try:
            # Daemons are not our children: gone once /proc no longer lists them.
            wait_for(lambda: not _killed_all(self.tag), 10, what="the fleet's processes to end")
        except AssertionError:
            pass
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
        self.namespaces.clear()


def pids_in_namespaces(inodes: Sequence[int]) -> list[int]:
    """Processes whose network namespace is one of `inodes` (a leftover keeps one alive)."""
    wanted = {f"net:[{inode}]" for inode in inodes}
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/net") in wanted:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def _killed_all(tag: str) -> bool:
    """Kill what is left under `tag`; whether anything was."""
    left = tagged_pids(tag)
    kill_tagged(tag)
    return bool(left)


def fleet_unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (bash .ci/run runs as root)"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    return None
