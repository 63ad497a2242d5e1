"""Real apps through nginx: fcgi-engine against uWSGI (FastCGI, and its own uwsgi protocol)
and gunicorn sync (HTTP behind proxy_pass), same worker count, same run (issue 11, item 2).

    python3 bench/realapps.py [--seconds 8] [--rounds 3] [--nproc 2] [--only PEER...]
                              [--python this|debian|PATH]

The apps (bench/apps): Flask `/json` (jsonify) and `/page` (a Jinja template, 20 rows);
Django `/items/` (the stock middleware, an ORM query of 20 rows from sqlite, a template).
For every round, app and backend: wrk -t2 -c16 through one nginx (common.NGINX_PEERS), the
backend's CPU per request (user+sys of its process tree / requests). FastCGI backends are
measured with fastcgi_keep_conn on and off; uWSGI's own protocol and gunicorn (whose sync
worker closes every connection) one way each. The peers run in a different order every
round; the summary is the median of the rounds, the range in brackets, and fcgi-engine's
ratio to each peer in the same mode (uwsgi and gunicorn: against fcgi-engine's keep_conn on,
the best each can do behind nginx). Needs nginx, wrk, uwsgi + uwsgi-plugin-python3 (Debian),
gunicorn, Flask and Django.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from common import (
    NGINX_PEERS,
    backend,
    cpu_seconds,
    median,
    nginx_front,
    peer_command,
    peer_prefix,
    socket_dir,
    tree,
    use_python,
    wait_port,
    wrk,
)

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps"

# app name -> (directory, module, callable, [(path, text the answer must contain)])
REAL_APPS = {
    "flask": (str(APPS), "flask_app", "app", [("/json", '"status"'), ("/page", "item 19")]),
    "django": (str(APPS / "benchsite"), "benchsite.wsgi", "application", [("/items/", "item 0")]),
}
PEERS = ("fcgi-engine", "uwsgi-fcgi", "uwsgi", "gunicorn")


def modes(peer: str) -> list[bool]:
    """The keep_conn settings a peer is measured with (only FastCGI has the choice)."""
    return [True, False] if peer in ("fcgi-engine", "uwsgi-fcgi") else [True]


def make_database() -> str:
    """A fresh sqlite database for the Django site (migrated, 200 items)."""
    db_dir = tempfile.mkdtemp(prefix="fe-bench-db-")
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"],
        cwd=APPS / "benchsite",
        env={**os.environ, "BENCH_DB_DIR": db_dir},
        check=True,
    )
    os.chmod(db_dir, 0o777)
    return db_dir


def check_answer(port: int, path: str, expected: str) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        text = answer.read().decode()
    if expected not in text:
        raise SystemExit(f"{path}: answer without {expected!r}: {text[:200]!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=PEERS)
    parser.add_argument(
        "--python",
        default="this",
        help="interpreter for fcgi-engine and gunicorn: this, debian (uWSGI's build), or a path",
    )
    parser.add_argument("--apps", nargs="*", choices=list(REAL_APPS), default=list(REAL_APPS))
    args = parser.parse_args()
    peers = [p for p in PEERS if not args.only or p in args.only]
    if not shutil.which("uwsgi"):
        print("uwsgi not installed; skipped", file=sys.stderr)
        peers = [p for p in peers if not p.startswith("uwsgi")]
    python = use_python(args.python)
    db_dir = make_database()
    os.environ["BENCH_DB_DIR"] = db_dir  # the backends inherit it
    # (app, path, peer, keep_conn) -> one result per round
    results: dict[tuple[str, str, str, bool], list[dict[str, float]]] = {}
    try:
        sock = f"{socket_dir()}/app.sock"
        with nginx_front(NGINX_PEERS, sock=sock) as (_d, port):
            wait_port(port)
            for round_no in range(args.rounds):
                order = peers if round_no % 2 == 0 else peers[::-1]
                for app_name in args.apps:
                    chdir, module, callable_name, paths = REAL_APPS[app_name]
                    for peer in order:
                        cmd = peer_command(
                            peer, sock, args.nproc, chdir, module, callable_name, python
                        )
                        with backend(cmd, sock) as proc:
                            for path, expected in paths:
                                for keep in modes(peer):
                                    url = peer_prefix(peer, keep) + path
                                    check_answer(port, url, expected)
                                    wrk(port, url, 1)  # warm up
                                    before = cpu_seconds(tree(proc.pid))
                                    result = wrk(port, url, args.seconds)
                                    used = cpu_seconds(tree(proc.pid)) - before
                                    result["cpu_us"] = used / max(1, result["requests"]) * 1e6
                                    results.setdefault((app_name, path, peer, keep), []).append(
                                        result
                                    )
                                    print(
                                        f"round {round_no + 1} {app_name:6s} {path:8s} "
                                        f"{peer:11s} keep_conn {'on ' if keep else 'off'} "
                                        f"{result['rps']:8.0f} req/s  p50 {result['p50_ms']:6.2f}"
                                        f" ms  p99 {result['p99_ms']:7.2f} ms  cpu "
                                        f"{result['cpu_us']:6.1f} us/req  errors "
                                        f"{result['errors']}",
                                        flush=True,
                                    )
    finally:
        shutil.rmtree(db_dir, ignore_errors=True)
    print_summary(results)
    return 0


def print_summary(results: dict[tuple[str, str, str, bool], list[dict[str, float]]]) -> None:
    print("\n| app | view | backend | keep_conn | req/s | p99 | CPU/req | fcgi-engine / it |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for (app_name, path, peer, keep), runs in results.items():
        rps = [r["rps"] for r in runs]
        ours = results.get((app_name, path, "fcgi-engine", keep or peer not in ("uwsgi-fcgi",)))
        ratio = ""
        if peer != "fcgi-engine" and ours:
            ratio = f"**{median([r['rps'] for r in ours]) / median(rps):.2f}**"
        spread = " / ".join(f"{x:,.0f}" for x in rps)
        errors = sum(r["errors"] for r in runs)
        print(
            f"| {app_name} | {path} | {peer} | {'on' if keep else 'off'} "
            f"| {median(rps):,.0f} [{spread}] | {median([r['p99_ms'] for r in runs]):.1f} ms "
            f"| {median([r['cpu_us'] for r in runs]):.0f} µs | {ratio} |"
            + (f" errors {errors}" if errors else "")
        )


if __name__ == "__main__":
    raise SystemExit(main())
