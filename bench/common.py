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
