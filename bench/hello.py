"""Hello-world through nginx: fcgi-engine against flup and uWSGI's FastCGI mode, same run.

    python3 bench/hello.py [--seconds 10] [--nproc 2]

For each backend and for fastcgi_keep_conn off and on: wrk -t2 -c16 through one nginx, then
requests/s, latency percentiles, and the backend's CPU time per request (user+sys of every
backend process over the run, divided by the requests served). Needs nginx, wrk, uwsgi with
uwsgi-plugin-python3 and libfcgi-engine-perl (Debian) and flup (PyPI). Loopback and unix
sockets only. --rounds N repeats the comparison and reports the median round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from common import NGINX, cpu_seconds, stop_group, tree, wait_socket, wrk

HERE = Path(__file__).resolve().parent


def backends(d: str, nproc: int) -> dict[str, list[str]]:
    sock = f"{d}/app.sock"
    return {
        "fcgi-engine": [
            sys.executable,
            "-m",
            "fcgi_engine",
            "serve",
            f"{HERE}/hello_app.py",
            "--listen",
            sock,
            "--nproc",
            str(nproc),
        ],
        "flup": [sys.executable, f"{HERE}/flup_server.py", sock, str(HERE), str(nproc)],
        "perl-fcgi-engine": [
            "perl",
            f"{HERE}/perl_engine.pl",
            "--nproc",
            str(nproc),
            "--listen",
            sock,
            "--pidfile",
            f"{d}/perl.pid",
        ],
        "uwsgi": [
            "uwsgi",
            "--plugin",
            "python3",
            "--fastcgi-socket",
            sock,
            "--chdir",
            str(HERE),
            "--wsgi-file",
            "hello_app.py",
            "--processes",
            str(nproc),
            "--master",
            "--disable-logging",
            "--chmod-socket=666",
            "--die-on-term",
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--only", nargs="*")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the whole comparison; ratios use the median round",
    )
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")
    d = tempfile.mkdtemp(prefix="fe-bench-")
    port = 18000 + os.getpid() % 1000
    conf = Path(d) / "nginx.conf"
    conf.write_text(
        NGINX.format(
            d=d, sock=f"{d}/app.sock", port=port, user="user root;" if os.geteuid() == 0 else ""
        )
    )
    nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", d])
    rows = []
    try:
        for _round in range(args.rounds):
            for name, cmd in backends(d, args.nproc).items():
                if args.only and name not in args.only:
                    continue
                if name == "uwsgi" and not shutil.which("uwsgi"):
                    print("uwsgi not installed; skipped", file=sys.stderr)
                    continue
                if (
                    name == "perl-fcgi-engine"
                    and subprocess.run(
                        ["perl", "-MFCGI::Engine", "-e1"], capture_output=True
                    ).returncode
                ):
                    print("Perl FCGI::Engine not installed; skipped", file=sys.stderr)
                    continue
                proc = subprocess.Popen(
                    cmd,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
                try:
                    wait_socket(f"{d}/app.sock")
                    os.chmod(f"{d}/app.sock", 0o666)
                    wrk(port, "/off", 1)  # warm up
                    for mode in ("off", "on"):
                        pids = tree(proc.pid)
                        before = cpu_seconds(pids)
                        result = wrk(port, f"/{mode}", args.seconds)
                        used = cpu_seconds(tree(proc.pid)) - before
                        result["cpu_us_per_req"] = used / max(1, result["requests"]) * 1e6
                        rows.append((name, mode, result))
                        print(
                            f"{name:12s} keep_conn {mode:3s} {result['rps']:9.0f} req/s  "
                            f"p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:7.2f} ms  "
                            f"cpu {result['cpu_us_per_req']:6.1f} us/req  "
                            f"errors {result['errors']}",
                            flush=True,
                        )
                finally:
                    stop_group(proc, 10)
                    for leftover in tree(proc.pid)[1:]:
                        try:
                            os.kill(leftover, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    try:
                        os.unlink(f"{d}/app.sock")
                    except OSError:
                        pass
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(10)
        shutil.rmtree(d, ignore_errors=True)
    by = {}
    for key in {(n, m) for n, m, _ in rows}:
        runs = sorted((r for n, m, r in rows if (n, m) == key), key=lambda r: r["rps"])
        by[key] = runs[len(runs) // 2]
    if args.rounds > 1:
        for (n, m), r in sorted(by.items()):
            print(
                f"median of {args.rounds}: {n:16s} keep_conn {m:3s} {r['rps']:9.0f} req/s  "
                f"p99 {r['p99_ms']:7.2f} ms  cpu {r['cpu_us_per_req']:6.1f} us/req"
            )
    for mode in ("off", "on"):
        ours = by.get(("fcgi-engine", mode))
        if not ours:
            continue
        for peer in ("flup", "perl-fcgi-engine", "uwsgi"):
            if (peer, mode) in by:
                print(
                    f"keep_conn {mode}: fcgi-engine / {peer} = "
                    f"{ours['rps'] / by[(peer, mode)]['rps']:.2f}x req/s, "
                    f"{ours['cpu_us_per_req'] / by[(peer, mode)]['cpu_us_per_req']:.2f}x cpu/req"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
