"""An app whose view waits 50 ms, 64 concurrent clients, 2 workers, through one nginx:
fcgi-engine `--threads N` (FastCGI, upstream keepalive) against gunicorn's gthread workers
(HTTP, nginx proxy_pass with keepalive) and, when `uwsgi` is on the PATH, uWSGI's threads
(`--fastcgi-socket`, `--processes N --threads T --enable-threads`, the same /fcgi/ location
as fcgi-engine), same run.

    python3 bench/threads.py [--seconds 10] [--threads 32] [--rounds 1]

This file is also the app they all serve (`application`). Needs nginx, wrk, gunicorn (PyPI);
uwsgi (PyPI, compiles; needs gcc and the Python headers) is optional.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from common import NGINX_HEAD, backend, nginx_front
from common import wrk as wrk_any

HERE = Path(__file__).resolve().parent
WAIT = 0.05
CLIENTS = 64

NGINX = (
    NGINX_HEAD
    + """\
  upstream fcgi {{ server unix:{d}/app.sock; keepalive 64; }}
  upstream http {{ server unix:{d}/http.sock; keepalive 64; }}
  server {{ listen 127.0.0.1:{port};
    location /fcgi/ {{ include /etc/nginx/fastcgi_params; fastcgi_pass fcgi;
                      fastcgi_keep_conn on; }}
    location /http/ {{ proxy_pass http://http; proxy_http_version 1.1;
                      proxy_set_header Connection ""; }}
  }}
}}
"""
)


def application(environ, start_response):  # type: ignore[no-untyped-def]
    time.sleep(WAIT)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return [b"waited"]


def backends(d: str, nproc: int, threads: int) -> dict[str, tuple[list[str], str, str]]:
    """name -> (command, socket it listens on, URL path through nginx)."""
    out = {
        "fcgi-engine threads": (
            [sys.executable, "-m", "fcgi_engine", "serve", f"{HERE}/threads.py",
             "--listen", f"{d}/app.sock", "--nproc", str(nproc), "--threads", str(threads)],
            f"{d}/app.sock",
            "/fcgi/",
        ),
        "gunicorn gthread": (
            ["gunicorn", "--chdir", str(HERE), "--bind", f"unix:{d}/http.sock", "--workers",
             str(nproc), "--worker-class", "gthread", "--threads", str(threads),
             "--keep-alive", "75", "threads:application"],
            f"{d}/http.sock",
            "/http/",
        ),
    }  # fmt: skip
    if shutil.which("uwsgi"):  # optional peer: same socket and nginx location as fcgi-engine
        out["uwsgi threads"] = (
            ["uwsgi", "--fastcgi-socket", f"{d}/app.sock", "--chmod-socket=666", "--pythonpath",
             str(HERE), "--module", "threads:application", "--master", "--processes", str(nproc),
             "--threads", str(threads), "--enable-threads", "--die-on-term", "--need-app",
             "--disable-logging"],
            f"{d}/app.sock",
            "/fcgi/",
        )  # fmt: skip
    return out


def wrk(port: int, path: str, seconds: float) -> dict[str, float]:
    return wrk_any(port, path, seconds, threads=4, connections=CLIENTS)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if not shutil.which("gunicorn"):
        raise SystemExit("gunicorn is not installed")
    ideal = min(CLIENTS, args.nproc * args.threads) / WAIT
    print(
        f"view waits {WAIT * 1000:g} ms, {CLIENTS} clients, {args.nproc} workers x "
        f"{args.threads} threads; ideal {ideal:.0f} req/s"
    )
    with nginx_front(NGINX) as (d, port):
        for _round in range(args.rounds):
            for name, (cmd, sock, path) in backends(d, args.nproc, args.threads).items():
                with backend(cmd, sock):
                    wrk(port, path, 1)  # warm up
                    r = wrk(port, path, args.seconds)
                    print(
                        f"{name:20s} {r['rps']:8.0f} req/s  p50 {r['p50_ms']:6.1f} ms  "
                        f"p99 {r['p99_ms']:6.1f} ms  errors {r['errors']:.0f}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
