"""Apache httpd, lighttpd and Caddy in front of fcgi-engine, as the tests' own processes.

Each front end is started from the Debian package's binary with a minimal configuration
written per test into its own directory (no packaged service, no file under /etc is read),
listens on a loopback port, and is stopped by pid at teardown with every process it started
(they carry the test's FCGI_TEST_TAG). `Fronts.explain()` attaches every front end's error
log, and the engines', to the report of a test that fails. nginx lives in conftest.py.

None of these three can take a listening socket from us as nginx does ($NGINX), so a port is
picked by binding port 0 and releasing it; a start that loses the port to another process is
retried on a new one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import ENGINE, can_connect, kill_tagged

APACHE_MODULES = Path("/usr/lib/apache2/modules")
BIG_BODY = 200 * 1024 * 1024  # what the front ends accept: above the tests' 100 MB uploads
PROXY_TIMEOUT = 120  # seconds: a 100 MB upload on a loaded 2-core machine has time

APACHE_CONF = """\
ServerRoot "{dir}"
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile "{dir}/httpd.pid"
DefaultRuntimeDir "{dir}"
Mutex file:{dir} default
ErrorLog "{dir}/error.log"
LogLevel warn
{user}
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule proxy_module {modules}/mod_proxy.so
LoadModule proxy_fcgi_module {modules}/mod_proxy_fcgi.so
StartServers 1
ServerLimit 2
ThreadsPerChild 25
MaxRequestWorkers 50
MinSpareThreads 10
MaxSpareThreads 50
KeepAlive On
Timeout {timeout}
ProxyTimeout {timeout}
LimitRequestBody {max_body}
<Location "/">
    Require all granted
</Location>
ProxyPass "/" "{target}" enablereuse={reuse}
"""

LIGHTTPD_CONF = """\
server.document-root = "{dir}"
server.bind = "127.0.0.1"
server.port = {port}
server.errorlog = "{dir}/error.log"
server.upload-dirs = ( "{dir}" )
server.max-request-size = {max_body_kib}
server.modules = ( "mod_fastcgi" )
fastcgi.server = ( "/" => ((
    {backend},
    "check-local" => "disable",
    "fix-root-scriptname" => "enable",
)))
"""

CADDY_CONF = """\
{{
	admin off
	storage file_system {{
		root "{dir}/data"
	}}
}}
http://127.0.0.1:{port} {{
	bind 127.0.0.1
	request_body {{
		max_size {max_body}
	}}
	reverse_proxy {target} {{
		transport fastcgi {{
			dial_timeout 5s
			read_timeout {timeout}s
			write_timeout {timeout}s
		}}
	}}
}}
"""


def free_port() -> int:
    """A loopback port free right now (bound on port 0 and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binary(name: str) -> str:
    """The path of a web server's binary; a machine without it fails the test (CI installs
    it: `bash .ci/run`)."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.fail(f"{name} is not installed: `bash .ci/run` installs it (apt-get install)")


@dataclass
class Front:
    """One running web server in front of fcgi-engine."""

    kind: str
    proc: subprocess.Popen[bytes]
    port: int
    dir: Path
    tag: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def error_log(self) -> str:
        """Its error log (lighttpd's holds a spawned engine's stderr too) and its stderr."""
        text = []
        for name in ("error.log", "stderr"):
            try:
                text.append((self.dir / name).read_text(errors="replace"))
            except OSError:
                pass
        return "".join(text)

    def errors(self) -> list[str]:
        """Lines of its error log that report a failed exchange or worse: Apache's at level
        error and above, lighttpd's from its FastCGI gateway, Caddy's at level error."""
        marks = {
            "apache": (":error]", ":crit]", ":alert]", ":emerg]"),
            "lighttpd": ("gw_backend", "mod_fastcgi", "connection-level"),
            "caddy": ('"level":"error"', '"level":"fatal"'),
        }[self.kind]
        return [line for line in self.error_log().splitlines() if any(m in line for m in marks)]

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            # All three stop on TERM (Apache at once, lighttpd and Caddy gracefully).
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        kill_tagged(self.tag)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class Spawned:
    """An fcgi-engine that lighttpd spawned: reached through its pidfile's control socket."""

    pidfile: str
    log_path: str

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""


def upstream_url(address: str, scheme: str) -> str:
    """An engine's address as Apache ("unix:PATH|fcgi://localhost/") or Caddy
    ("unix//PATH") names it."""
    if scheme == "apache":
        if address.startswith("/"):
            return f"unix:{address}|fcgi://localhost/"
        return f"fcgi://{address}/"
    return f"unix/{address}" if address.startswith("/") else address


@dataclass
class Fronts:
    """Starts front ends under `root` for one test; `stop_all()` at its end."""

    root: Path
    request: pytest.FixtureRequest
    started: list[Front] = field(default_factory=list)
    logs: list[Callable[[], str]] = field(default_factory=list)

    def apache(self, upstream: str, reuse: bool) -> Front:
        """Apache httpd (mpm_event, mod_proxy_fcgi) proxying every path to `upstream`."""
        # Apache will not run its workers as root: they run as www-data, which the engine's
        # unix socket must let in (serve it with --socket-mode 0666).
        user = "User www-data\nGroup www-data" if os.geteuid() == 0 else ""

        def conf(d: Path, port: int) -> str:
            return APACHE_CONF.format(
                dir=d,
                port=port,
                user=user,
                modules=APACHE_MODULES,
                timeout=PROXY_TIMEOUT,
                max_body=BIG_BODY,
                target=upstream_url(upstream, "apache"),
                reuse="on" if reuse else "off",
            )

        return self._start(
            "apache",
            conf,
            lambda d: [binary("apache2"), "-d", str(d), "-f", str(d / "conf"), "-DFOREGROUND"],
        )

    def lighttpd(self, upstream: str | None = None, spawn: Sequence[str] = ()) -> Front:
        """lighttpd's mod_fastcgi to the engine on `upstream`, or spawning `spawn` (lighttpd
        binds the socket and passes it as fd 0) when no upstream is given."""

        def conf(d: Path, port: int) -> str:
            if upstream is not None:
                backend = f'"socket" => "{upstream}"'
                if not upstream.startswith("/"):
                    host, tcp_port = upstream.rsplit(":", 1)
                    backend = f'"host" => "{host}", "port" => {tcp_port}'
            else:
                # lighttpd splits bin-path on spaces: the tests' paths have none.
                backend = (
                    f'"socket" => "{d}/spawn.sock", "bin-path" => "{" ".join(spawn)}", '
                    '"max-procs" => 1'
                )
            return LIGHTTPD_CONF.format(
                dir=d, port=port, max_body_kib=BIG_BODY // 1024, backend=backend
            )

        return self._start(
            "lighttpd", conf, lambda d: [binary("lighttpd"), "-D", "-f", str(d / "conf")]
        )

    def caddy(self, upstream: str) -> Front:
        """Caddy's reverse_proxy with its FastCGI transport to `upstream`."""

        def conf(d: Path, port: int) -> str:
            return CADDY_CONF.format(
                dir=d,
                port=port,
                max_body=BIG_BODY,
                timeout=PROXY_TIMEOUT,
                target=upstream_url(upstream, "caddy"),
            )

        return self._start(
            "caddy",
            conf,
            lambda d: [
                binary("caddy"),
                "run",
                "--config",
                str(d / "conf"),
                "--adapter",
                "caddyfile",
            ],
        )

    def _start(
        self,
        kind: str,
        conf: Callable[[Path, int], str],
        command: Callable[[Path], list[str]],
        attempts: int = 3,
    ) -> Front:
        for attempt in range(attempts):
            fdir = self.root / f"{kind}{len(self.started)}-{attempt}"
            fdir.mkdir()
            os.chmod(fdir, 0o755)  # Apache's workers (www-data) reach the sockets inside
            port = free_port()
            (fdir / "conf").write_text(conf(fdir, port))
            tag = f"front-{os.getpid()}-{time.monotonic_ns()}"
            # Caddy keeps its state under $HOME and the XDG directories: here, not in /root.
            env = dict(
                os.environ,
                FCGI_TEST_TAG=tag,
                HOME=str(fdir),
                XDG_CONFIG_HOME=str(fdir / "config"),
                XDG_DATA_HOME=str(fdir / "data"),
            )
            with open(fdir / "stderr", "wb") as stderr:
                proc = subprocess.Popen(
                    command(fdir),
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                    env=env,
                    cwd=fdir,
                )
            front = Front(kind, proc, port, fdir, tag)
            self.started.append(front)
            self.watch(f"{kind} in {fdir}", front.error_log)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and proc.poll() is None:
                if can_connect(f"127.0.0.1:{port}"):
                    return front
                time.sleep(0.05)
            front.stop()
            if "in use" not in front.error_log():
                raise AssertionError(f"{kind} did not start:\n{front.error_log()}")
        raise AssertionError(f"{kind}: no free port in {attempts} attempts")

    def watch(self, name: str, log: Callable[[], str]) -> None:
        """Attach another log (an engine's) to the report of a failing test."""
        self.logs.append(lambda: f"--- {name}\n{log()}")

    @contextmanager
    def explain(self) -> Iterator[None]:
        """Run a test's body; if it fails, its report carries every watched log."""
        try:
            yield
        except BaseException:
            text = "\n".join(log() for log in self.logs)
            self.request.node.add_report_section("call", "web server and engine logs", text)
            raise

    def stop_all(self) -> None:
        for front in reversed(self.started):
            front.stop()


def spawn_command(app: str, pidfile: str, log: str, *args: str) -> list[str]:
    """The engine command a web server spawns: it serves on the socket at fd 0."""
    return [*ENGINE, "serve", app, "--pidfile", pidfile, "--error-log", log, *args]
