"""What the benchmarks share: one nginx in front of the backend under test (NGINX: `/off`,
fastcgi_keep_conn off, and `/on`, an upstream keepalive pool; NGINX_HEAD for benchmarks with
upstreams of their own), wrk, the CPU time of a process tree, and stopping a backend."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")

NGINX_HEAD = """
daemon off; worker_processes 1; {user} pid {d}/nginx.pid; error_log {d}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{ access_log off;
  client_body_temp_path {d}/b; fastcgi_temp_path {d}/f; proxy_temp_path {d}/p;
  uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;
"""
NGINX = (
    NGINX_HEAD
    + """\
  upstream off {{ server unix:{sock}; }}
  upstream on {{ server unix:{sock}; keepalive 32; }}
  server {{ listen 127.0.0.1:{port};
    location /off {{ include /etc/nginx/fastcgi_params; fastcgi_pass off; }}
    location /on {{ include /etc/nginx/fastcgi_params; fastcgi_pass on; fastcgi_keep_conn on; }}
  }}
}}
"""
)


def tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def wait_socket(path: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"backend never listened on {path}")


def wrk(
    port: int, path: str, seconds: float, threads: int = 2, connections: int = 16
) -> dict[str, float]:
    """wrk against nginx on `port`: req/s, requests, errors (non-2xx and socket), p50/p99 ms."""
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--latency",
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    result = {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
    }
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    result["errors"] = (int(errors.group(1)) if errors else 0) + (
        sum(int(x) for x in socket_errors.groups()) if socket_errors else 0
    )
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        result[f"p{pct}_ms"] = float(m.group(1)) * scale
    return result


def stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:  # type: ignore[type-arg]
    """TERM the backend's process group, KILL it if it is not gone within `timeout`."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def nginx_front(template: str, **fields: object) -> Iterator[tuple[str, int]]:
    """nginx from `template` (formatted with d, port, user and `fields`) in a fresh directory:
    yields (directory, port); stops nginx and removes the directory after."""
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")
    d = tempfile.mkdtemp(prefix="fe-bench-")
    port = 18000 + os.getpid() % 2000
    conf = os.path.join(d, "nginx.conf")
    user = "user root;" if os.geteuid() == 0 else ""
    with open(conf, "w") as f:
        f.write(template.format(d=d, port=port, user=user, **fields))
    nginx = subprocess.Popen(["nginx", "-c", conf, "-p", d])
    try:
        yield d, port
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(10)
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def backend(cmd: list[str], sock: str) -> Iterator[subprocess.Popen]:  # type: ignore[type-arg]
    """The backend `cmd` in its own session, once it listens on `sock` (made world-writable
    for nginx); stopped and its socket removed after."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_socket(sock)
        os.chmod(sock, 0o666)
        yield proc
    finally:
        stop_group(proc, 15)
        try:
            os.unlink(sock)
        except OSError:
            pass


# ---------------------------------------------------------------- peers (issue 11)
#
# One nginx in front of whichever backend listens on {sock}, reached four ways: FastCGI with
# an upstream keepalive pool (/fcgi-on/...), FastCGI one connection per request
# (/fcgi-off/...), uWSGI's own protocol (/uwsgi/...) and HTTP (/http/..., proxy_pass, for
# gunicorn). The params are nginx's stock fastcgi_params (= uwsgi_params) except SCRIPT_NAME
# and PATH_INFO, which say the app is mounted at the root with the prefix taken off, so every
# backend and protocol routes the same path the same way.

_CGI_PARAMS = (
    ("QUERY_STRING", "$query_string"),
    ("REQUEST_METHOD", "$request_method"),
    ("CONTENT_TYPE", "$content_type"),
    ("CONTENT_LENGTH", "$content_length"),
    ("SCRIPT_NAME", '""'),
    ("PATH_INFO", "$1"),
    ("REQUEST_URI", "$request_uri"),
    ("DOCUMENT_URI", "$document_uri"),
    ("DOCUMENT_ROOT", "$document_root"),
    ("SERVER_PROTOCOL", "$server_protocol"),
    ("REQUEST_SCHEME", "$scheme"),
    ("HTTPS", "$https if_not_empty"),
    ("GATEWAY_INTERFACE", "CGI/1.1"),
    ("SERVER_SOFTWARE", "nginx/$nginx_version"),
    ("REMOTE_ADDR", "$remote_addr"),
    ("REMOTE_PORT", "$remote_port"),
    ("SERVER_ADDR", "$server_addr"),
    ("SERVER_PORT", "$server_port"),
    ("SERVER_NAME", "$server_name"),
)


def _params(directive: str) -> str:
    # Doubled braces: the result is part of a str.format template.
    return " ".join(f"{directive} {name} {value};" for name, value in _CGI_PARAMS)


NGINX_PEERS = (
    NGINX_HEAD
    + """\
  client_max_body_size 0;
  upstream pooled {{ server unix:{sock}; keepalive 32; }}
  upstream single {{ server unix:{sock}; }}
  server {{ listen 127.0.0.1:{port};
    location ~ ^/fcgi-on(/.*)$ {{ PARAMS_FCGI fastcgi_pass pooled; fastcgi_keep_conn on; }}
    location ~ ^/fcgi-off(/.*)$ {{ PARAMS_FCGI fastcgi_pass single; }}
    location ~ ^/uwsgi(/.*)$ {{ PARAMS_UWSGI uwsgi_pass single; }}
    location /http/ {{ proxy_pass http://pooled/; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header Host $host; }}
  }}
}}
""".replace("PARAMS_FCGI", _params("fastcgi_param")).replace("PARAMS_UWSGI", _params("uwsgi_param"))
)

# Debian's uWSGI embeds Debian's python3; this puts the benchmark interpreter's packages
# (Flask, Django, ...) first on its path, so both sides run the very same app code.
SITE_PACKAGES = next(p for p in __import__("sys").path if p.endswith("site-packages"))


def peer_command(
    peer: str,
    sock: str,
    nproc: int,
    chdir: str,
    module: str,
    callable_name: str = "application",
    python: str = "",
    extra: tuple[str, ...] = (),
) -> list[str]:
    """The command serving the WSGI app `module:callable_name` (importable from `chdir`) on
    the unix socket `sock` with `nproc` processes, for `peer`: fcgi-engine (FastCGI),
    uwsgi-fcgi (uWSGI's FastCGI mode), uwsgi (uWSGI's own protocol), gunicorn (sync, HTTP).
    fcgi-engine and gunicorn run on `python` (default: this interpreter); `extra` is added
    to the command line."""
    import sys

    python = python or sys.executable

    if peer == "fcgi-engine":
        return [
            python,
            "-m",
            "fcgi_engine",
            "serve",
            f"{module}:{callable_name}",
            "--listen",
            sock,
            "--nproc",
            str(nproc),
            "--chdir",
            chdir,
            *extra,
        ]
    if peer in ("uwsgi-fcgi", "uwsgi"):
        return [
            "uwsgi",
            "--plugin",
            "python3",
            "--fastcgi-socket" if peer == "uwsgi-fcgi" else "--socket",
            sock,
            "--chdir",
            chdir,
            "--pythonpath",
            chdir,
            "--pythonpath",
            SITE_PACKAGES,
            "--module",
            f"{module}:{callable_name}",
            "--processes",
            str(nproc),
            "--master",
            "--disable-logging",
            "--chmod-socket=666",
            "--die-on-term",
            *extra,
        ]
    if peer == "gunicorn":
        return [
            python,
            "-m",
            "gunicorn",
            "--workers",
            str(nproc),
            "--worker-class",
            "sync",
            "--chdir",
            chdir,
            "--bind",
            f"unix:{sock}",
            *extra,
            f"{module}:{callable_name}",
        ]
    raise ValueError(f"unknown peer {peer}")


def peer_prefix(peer: str, keep_conn: bool = True) -> str:
    """The nginx path prefix (in NGINX_PEERS) that reaches `peer`."""
    if peer == "uwsgi":
        return "/uwsgi"
    if peer == "gunicorn":
        return "/http"
    return "/fcgi-on" if keep_conn else "/fcgi-off"


def workers_of(root: int, timeout: float = 20.0, count: int = 0) -> list[int]:
    """The leaf processes under `root` (the workers of every backend here), once there are
    at least `count` of them and the set has not changed for a second (an fcgi-engine
    generation is itself a leaf until it forks its workers); waits up to `timeout`."""
    deadline = time.monotonic() + timeout
    last: list[int] = []
    since = time.monotonic()
    while True:
        pids = tree(root)
        parents = {_ppid(pid) for pid in pids}
        leaves = sorted(pid for pid in pids if pid != root and pid not in parents)
        if leaves != last:
            last, since = leaves, time.monotonic()
        elif len(leaves) >= count and time.monotonic() - since >= 1.0:
            return leaves
        if time.monotonic() > deadline:
            return leaves
        time.sleep(0.1)


def _ppid(pid: int) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def median(values: list[float]) -> float:
    """The median (the mean of the middle two for an even count)."""
    ordered = sorted(values)
    return (
        ordered[len(ordered) // 2]
        if len(ordered) % 2
        else sum(ordered[len(ordered) // 2 - 1 : len(ordered) // 2 + 1]) / 2
    )


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Wait until something listens on 127.0.0.1:`port` (nginx after nginx_front starts it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listened on port {port}")


def socket_dir() -> str:
    """A fresh directory nginx (which may run as another user) can reach a socket in."""
    d = tempfile.mkdtemp(prefix="fe-bench-sock-")
    os.chmod(d, 0o755)
    return d


DEBIAN_PYTHON = "/usr/bin/python3"


def use_python(python: str) -> str:
    """Run fcgi-engine and gunicorn on `python` ("debian": Debian's /usr/bin/python3, the
    build uWSGI embeds; "" or "this": this interpreter), with this checkout's src and this
    interpreter's packages on its path. Returns the interpreter's path."""
    import sys

    if python in ("", "this"):
        return sys.executable
    path = DEBIAN_PYTHON if python == "debian" else python
    src = str(Path(__file__).resolve().parent.parent / "src")
    os.environ["PYTHONPATH"] = os.pathsep.join([src, SITE_PACKAGES])
    return path
