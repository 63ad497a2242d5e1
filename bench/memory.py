"""Memory of a Django app's workers (issue 11, item 4): USS and PSS per worker after boot and
after serving, fcgi-engine against uWSGI and gunicorn (same nproc, same app, same run); then
what idle FastCGI keep-alive connections cost an fcgi-engine worker.

    python3 bench/memory.py [--nproc 2] [--idle 1000] [--python this|debian|PATH]

The app is bench/apps/benchsite (Django, the stock middleware, sqlite). Figures come from
/proc/PID/smaps_rollup: USS = Private_Clean + Private_Dirty (what the worker alone holds,
freed if it exits), PSS = Pss (its fair share of pages shared with the master and the other
workers). "after boot": once every worker's RSS is still for 1 s, before any request;
"after serving": after 3 s of wrk -c16 on /items/ through nginx (the first requests fill
Django's lazy caches and write to shared pages, which copy-on-write then duplicates).
gunicorn loads the app in every worker after the fork unless --preload: both are shown.

Idle connections: one fcgi-engine worker (nproc 1), USS and open fds before and after `idle`
unix-socket connections each send one keep-alive request (/hello/) and then stay open.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import subprocess
import sys
import time

from common import (
    NGINX_PEERS,
    backend,
    nginx_front,
    peer_command,
    peer_prefix,
    socket_dir,
    use_python,
    wait_port,
    workers_of,
    wrk,
)
from realapps import REAL_APPS, make_database

from fcgi_engine.client import Exchange, build_params, encode_request

KIB = 1024


def smaps_rollup(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/smaps_rollup, in bytes."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * KIB
    return fields


def uss_pss(pid: int) -> tuple[int, int, int]:
    """(USS, PSS, RSS) of one process, in bytes."""
    m = smaps_rollup(pid)
    return m["Private_Clean"] + m["Private_Dirty"], m["Pss"], m["Rss"]


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def settled_workers(root: int, count: int, timeout: float = 30.0) -> list[int]:
    """The `count` workers under `root`, once none of their RSS moved for a second."""
    deadline = time.monotonic() + timeout
    workers = workers_of(root, timeout, count)
    last: list[int] = []
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        workers = workers_of(root, 1, count)
        now = [rss(p) for p in workers]
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= 1.0:
            return workers
        time.sleep(0.1)
    raise SystemExit(f"the workers of {root} never settled")


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f}"


PEERS = {
    "fcgi-engine": ("fcgi-engine", ()),
    "uwsgi": ("uwsgi-fcgi", ()),
    "gunicorn": ("gunicorn", ()),
    "gunicorn --preload": ("gunicorn", ("--preload",)),
}


def compare(args: argparse.Namespace, python: str) -> None:
    chdir, module, callable_name, _paths = REAL_APPS["django"]
    print(
        "| backend | worker USS after boot | PSS after boot | USS after serving | "
        "PSS after serving | RSS after serving |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    sock = f"{socket_dir()}/app.sock"
    with nginx_front(NGINX_PEERS, sock=sock) as (_d, port):
        wait_port(port)
        for label, (peer, extra) in PEERS.items():
            if peer.startswith("uwsgi") and not shutil.which("uwsgi"):
                continue
            cmd = peer_command(peer, sock, args.nproc, chdir, module, callable_name, python, extra)
            with backend(cmd, sock) as proc:
                workers = settled_workers(proc.pid, args.nproc)
                booted = [uss_pss(p) for p in workers]
                wrk(port, peer_prefix(peer) + "/items/", 3)
                served = [uss_pss(p) for p in workers]
            print(
                f"| {label} | {' / '.join(mib(u) for u, _, _ in booted)} MiB "
                f"| {' / '.join(mib(p) for _, p, _ in booted)} MiB "
                f"| {' / '.join(mib(u) for u, _, _ in served)} MiB "
                f"| {' / '.join(mib(p) for _, p, _ in served)} MiB "
                f"| {' / '.join(mib(r) for _, _, r in served)} MiB |",
                flush=True,
            )


def idle_connections(args: argparse.Namespace, python: str) -> None:
    chdir, module, callable_name, _paths = REAL_APPS["django"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.idle + 256)), hard))
    sock = f"{socket_dir()}/app.sock"
    extra = ("--worker-connections", str(args.idle + 16))
    cmd = peer_command("fcgi-engine", sock, 1, chdir, module, callable_name, python, extra)
    request = encode_request(1, build_params(path="/hello/"), keep_conn=True)
    with backend(cmd, sock) as proc:
        (worker,) = settled_workers(proc.pid, 1)
        # One request first, so the lazy first-request work is not counted as the idle cost.
        warm = socket.socket(socket.AF_UNIX)
        warm.connect(sock)
        warm.sendall(request)
        Exchange(warm, 1).read_response()
        warm.close()
        time.sleep(0.5)
        before = uss_pss(worker)
        fds_before = len(os.listdir(f"/proc/{worker}/fd"))
        held = []
        for _ in range(args.idle):
            conn = socket.socket(socket.AF_UNIX)
            conn.settimeout(10)
            conn.connect(sock)
            conn.sendall(request)
            answer = Exchange(conn, 1).read_response()
            if answer.status != 200:
                raise SystemExit(f"keep-alive request answered {answer.status}")
            held.append(conn)
        time.sleep(1.0)
        after = uss_pss(worker)
        fds_after = len(os.listdir(f"/proc/{worker}/fd"))
        # Still served while they idle: a new connection is answered.
        probe = socket.socket(socket.AF_UNIX)
        probe.connect(sock)
        probe.sendall(request)
        alive = Exchange(probe, 1).read_response().status
        probe.close()
        for conn in held:
            conn.close()
    grown = after[0] - before[0]
    print(
        f"\n{args.idle} idle keep-alive connections on one fcgi-engine worker: USS "
        f"{mib(before[0])} -> {mib(after[0])} MiB (+{mib(grown)} MiB, "
        f"{grown / args.idle / KIB:.1f} KiB each), open fds {fds_before} -> {fds_after}, "
        f"a new request meanwhile answered {alive}"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--python", default="this")
    args = parser.parse_args()
    python = use_python(args.python)
    db_dir = make_database()
    os.environ["BENCH_DB_DIR"] = db_dir
    try:
        subprocess.run([python, "-c", "import sys; print(sys.version)"], check=True)
        compare(args, python)
        idle_connections(args, python)
    finally:
        shutil.rmtree(db_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
