"""Tail latency when saturated, with keep-alive (issue 11 item 6): a view that waits 200 ms,
2 workers, 20 clients through nginx, fastcgi_keep_conn off (a connection per request) against
on (upstream keepalive 32), same run, alternating.

    python3 bench/keepalive.py [--seconds 20] [--rounds 3] [--before SRC] [--uwsgi]

The workers can answer 10 req/s, the clients ask for more: every request queues. With
keep-conn off the queue is the listen backlog, which every worker takes from (FIFO); with it
on, a request sent on a kept-alive connection is read only by the worker that holds the
connection. wrk runs with a 30 s timeout so that no slow answer is dropped from the
percentiles (wrk's default, 2 s, would hide them as "timeouts").

--before SRC also runs fcgi-engine from another source tree (PYTHONPATH=SRC), e.g. the last
commit: `git archive HEAD src | tar -x -C /tmp/before` then `--before /tmp/before/src`.
--uwsgi adds uWSGI's FastCGI mode (2 processes) as a peer, on the same two locations.

This file is also the app they serve (`application`). Needs nginx and wrk.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from common import NGINX, backend, nginx_front

from fcgi_engine.client import ClientError, request

HERE = Path(__file__).resolve().parent
WAIT = 0.2
CLIENTS = 20


def application(environ, start_response):  # type: ignore[no-untyped-def]
    time.sleep(WAIT)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return [b"waited"]


def wrk(port: int, path: str, seconds: float) -> dict[str, float]:
    """wrk -t2 -c20 --timeout 30s: req/s, p50/p99/max ms, timeouts and errors."""
    out = subprocess.run(
        ["wrk", "-t2", f"-c{CLIENTS}", f"-d{seconds:g}s", "--timeout", "30s", "--latency",
         f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, timeout=seconds + 60,
    ).stdout  # fmt: skip

    def ms(text: str) -> float:
        m = re.match(r"([\d.]+)(us|ms|s|m)", text)
        assert m, text
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]

    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        result[f"p{pct}_ms"] = ms(re.search(rf"\s{pct}%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    result["max_ms"] = ms(re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    sock_err = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["timeouts"] = int(sock_err.group(4)) if sock_err else 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(int(x) for x in sock_err.groups()[:3]) if sock_err else 0
    )
    return result


def backends(sock: str, before: str | None, with_uwsgi: bool) -> dict[str, tuple[list[str], dict]]:
    serve = [sys.executable, "-m", "fcgi_engine", "serve", f"{HERE}/keepalive.py",
             "--listen", sock, "--nproc", "2"]  # fmt: skip
    out: dict[str, tuple[list[str], dict]] = {"fcgi-engine": (serve, {})}
    if before:
        out["fcgi-engine (before)"] = (serve, {"PYTHONPATH": before})
    if with_uwsgi:
        out["uWSGI FastCGI"] = (
            ["uwsgi", "--plugin", "python3", "--fastcgi-socket", sock, "--chmod-socket=666",
             "--pythonpath", str(HERE), "--module", "keepalive:application", "--master",
             "--processes", "2", "--die-on-term", "--need-app", "--disable-logging"],
            {},
        )  # fmt: skip
    return out


@contextlib.contextmanager
def running(cmd: list[str], sock: str, env: dict[str, str]) -> Iterator[None]:
    """common.backend with extra environment variables (PYTHONPATH for --before)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with backend(cmd, sock):
            # The socket is bound before the workers are ready: wait for an answer, so that
            # the boot's delay is not counted in the first requests' latency.
            deadline = time.monotonic() + 30
            while True:
                try:
                    if request(sock, "/", timeout=5).status == 200:
                        break
                except ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"{cmd[0]} never answered on {sock}")
                time.sleep(0.05)
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", help="another source tree of fcgi-engine to run beside")
    parser.add_argument("--uwsgi", action="store_true", help="add uWSGI's FastCGI mode")
    args = parser.parse_args()
    print(
        f"view waits {WAIT * 1000:g} ms, {CLIENTS} clients, 2 workers: at most "
        f"{2 / WAIT:g} req/s; wrk -t2 -c{CLIENTS} -d{args.seconds:g}s --timeout 30s",
        flush=True,
    )
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    sock = f"/tmp/fe-keepalive-{os.getpid()}.sock"
    for rnd in range(args.rounds):
        for name, (cmd, env) in backends(sock, args.before, args.uwsgi).items():
            # Alternate the order of keep-conn off and on from round to round.
            for mode in ("off", "on") if rnd % 2 == 0 else ("on", "off"):
                # A fresh nginx per cell: no kept-alive connection to an earlier backend.
                with nginx_front(NGINX, sock=sock) as (_d, port), running(cmd, sock, env):
                    r = wrk(port, f"/{mode}", args.seconds)
                runs.setdefault((name, mode), []).append(r)
                print(
                    f"round {rnd + 1} {name:22s} keep_conn {mode:3s} {r['rps']:6.2f} req/s "
                    f"p50 {r['p50_ms']:7.0f} ms  p99 {r['p99_ms']:7.0f} ms  "
                    f"max {r['max_ms']:7.0f} ms  timeouts {r['timeouts']:.0f}  "
                    f"errors {r['errors']:.0f}",
                    flush=True,
                )
    print("\n| backend | keep_conn | req/s | p50 | p99 (spread) | max | timeouts |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for (name, mode), rs in runs.items():
        p99s = sorted(r["p99_ms"] for r in rs)
        print(
            f"| {name} | {mode} | {statistics.median(r['rps'] for r in rs):.2f} | "
            f"{statistics.median(r['p50_ms'] for r in rs):,.0f} ms | "
            f"{statistics.median(p99s):,.0f} ms ({p99s[0]:,.0f}-{p99s[-1]:,.0f}) | "
            f"{statistics.median(r['max_ms'] for r in rs):,.0f} ms | "
            f"{sum(r['timeouts'] for r in rs):.0f} |"
        )
    for name in {n for n, _m in runs}:
        on = statistics.median(r["p99_ms"] for r in runs[(name, "on")])
        off = statistics.median(r["p99_ms"] for r in runs[(name, "off")])
        print(f"{name}: p99 keep_conn on / off = {on / off:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
