"""ASGI through one nginx: fcgi-engine's ASGI workers (FastCGI, upstream keepalive) against
uvicorn (HTTP, nginx proxy_pass with keepalive), same worker count, same run, 64 clients:
a hello world, and a view that waits 50 ms.

    python3 bench/asgi.py [--seconds 10] [--nproc 2] [--rounds 1]

This file is also the app both serve (`app`). Needs nginx, wrk, uvicorn (PyPI). The nginx
config and the wrk runner are bench/threads.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from common import backend, nginx_front
from threads import CLIENTS, NGINX, wrk

HERE = Path(__file__).resolve().parent
WAIT = 0.05


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        raise ValueError("no lifespan here")
    if scope["path"].endswith("/wait"):
        await asyncio.sleep(WAIT)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"12")],
        }
    )
    await send({"type": "http.response.body", "body": b"hello world\n"})


def backends(d: str, nproc: int) -> dict[str, tuple[list[str], str, str]]:
    """name -> (command, socket it listens on, URL path prefix through nginx)."""
    return {
        "fcgi-engine asgi": (
            [sys.executable, "-m", "fcgi_engine", "serve", f"{HERE}/asgi.py:app",
             "--listen", f"{d}/app.sock", "--nproc", str(nproc), "--lifespan", "off"],
            f"{d}/app.sock",
            "/fcgi/",
        ),
        "uvicorn": (
            [sys.executable, "-m", "uvicorn", "--app-dir", str(HERE), "--uds", f"{d}/http.sock",
             "--workers", str(nproc), "--lifespan", "off", "--no-access-log",
             "--log-level", "warning", "asgi:app"],
            f"{d}/http.sock",
            "/http/",
        ),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print(f"{CLIENTS} clients, {args.nproc} workers, {args.seconds:g} s per run")
    with nginx_front(NGINX) as (d, port):
        for _round in range(args.rounds):
            for name, (cmd, sock, prefix) in backends(d, args.nproc).items():
                with backend(cmd, sock):
                    for view in ("hello", "wait"):
                        wrk(port, prefix + view, 1)  # warm up
                        r = wrk(port, prefix + view, args.seconds)
                        print(
                            f"{name:18s} {view:6s} {r['rps']:8.0f} req/s  "
                            f"p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
                            f"errors {r['errors']:.0f}",
                            flush=True,
                        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
