"""Where a hello-world request's microseconds go in an fcgi-engine worker (issue 11, item 1).

    python3 bench/profile_worker.py [--seconds 5] [--iterations 20000] [--python this|debian]

Two parts:
1. Syscalls: one worker (nproc 1) behind nginx, `strace -c -f -p WORKER` while wrk -t2 -c16
   runs for `seconds` on fastcgi_keep_conn off and on; calls per request for each syscall,
   and the worker's CPU per request with and without strace attached (strace inflates it).
2. Stages, in process, on the request nginx really sends (captured once from nginx): the
   worker's own functions timed one at a time over `iterations` runs: record parsing and
   params decoding (protocol.Connection up to StdinEnd, and decode_params alone), the
   environ (worker._environ's build_environ + InputStream), the app call alone, run_app
   with the response records built (wsgi.run_app + Connection.stdout/end_request), and the
   send (one socket.send of the response on a unix socketpair, with the reader's recv).
The rest of the measured CPU per request is the loop: epoll, accept, recv, close, the
scoreboard and the bookkeeping between the stages.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    NGINX,
    backend,
    cpu_seconds,
    nginx_front,
    socket_dir,
    use_python,
    wait_port,
    workers_of,
    wrk,
)

HERE = Path(__file__).resolve().parent
HEADER = struct.Struct("!BBHHBx")


def capture_nginx_request(keep_conn: bool) -> bytes:
    """The bytes nginx sends for `GET /on|off` from curl: a one-shot listener takes them."""
    sock_path = f"{socket_dir()}/app.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sock_path)
    os.chmod(sock_path, 0o666)
    listener.listen(1)
    mode = "on" if keep_conn else "off"
    with nginx_front(NGINX, sock=sock_path) as (_d, port):
        wait_port(port)
        curl = subprocess.Popen(
            ["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/{mode}"]
        )
        conn, _ = listener.accept()
        data = b""
        # The request ends with an empty STDIN record.
        while not data.endswith(b"\x01\x05\x00\x01\x00\x00\x00\x00"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        conn.close()
        curl.wait(10)
    listener.close()
    return data


def params_blob(request: bytes) -> bytes:
    out, at = [], 0
    while at < len(request):
        _v, rtype, _rid, clen, plen = HEADER.unpack_from(request, at)
        if rtype == 4:
            out.append(request[at + 8 : at + 8 + clen])
        at += 8 + clen + plen
    return b"".join(out)


def per_call_us(fn: Callable[[], object], iterations: int) -> float:
    """The median of 5 batches of `iterations` calls, in µs per call."""
    batches = []
    for _ in range(5):
        start = time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        batches.append((time.perf_counter_ns() - start) / iterations / 1000)
    return sorted(batches)[2]


def stages(iterations: int) -> None:
    # Imported here: part 1 may run on another interpreter, and this part times this one.
    sys.path.insert(0, str(HERE))
    from hello_app import application

    from fcgi_engine.protocol import Connection, StdinEnd
    from fcgi_engine.protocol.codec import decode_params
    from fcgi_engine.serving.body import EMPTY_BODY, InputStream
    from fcgi_engine.serving.environ import build_environ
    from fcgi_engine.serving.wsgi import ErrorStream, FileWrapper, run_app

    request = capture_nginx_request(keep_conn=True)
    blob = params_blob(request)
    params = decode_params(blob)
    print(
        f"\nnginx's request: {len(request)} bytes, {len(params)} params "
        f"({len(blob)} bytes of name-values)"
    )

    def parse() -> None:
        proto = Connection()
        proto.receive_data(request)
        while type(proto.next_event()) is not StdinEnd:
            pass

    errors = ErrorStream(sys.stderr)

    def environ() -> dict[str, Any]:
        env = build_environ(dict(params), InputStream(EMPTY_BODY), errors, None)
        env["wsgi.file_wrapper"] = FileWrapper
        return env

    def copy() -> None:
        dict(params)

    env0 = environ()

    def start_response(status: str, headers: list[Any], exc_info: Any = None) -> None:
        return None

    def app_alone() -> None:
        for _ in application(env0, start_response):
            pass

    proto = Connection()
    proto.receive_data(request)
    while type(proto.next_event()) is not StdinEnd:
        pass
    out: list[bytes] = []

    def send(data: bytes) -> None:
        out.append(proto.stdout(1, data))

    def finish(data: bytes) -> None:
        out.append(proto.stdout(1, data) + proto.end_request(1))

    def respond() -> None:
        out.clear()
        run_app(application, environ(), send, finish)

    respond()
    response = b"".join(out)
    a, b = socket.socketpair()

    def send_response() -> None:
        # The reader's recv is in the figure too (an upper bound for the send alone).
        a.send(response)
        b.recv(65536)

    rows = [
        (
            "record parsing + params decoding (Connection, to StdinEnd)",
            per_call_us(parse, iterations),
        ),
        (
            "  of which params decoding (decode_params)",
            per_call_us(lambda: decode_params(blob), iterations),
        ),
        (
            "environ (copy of params + build_environ + InputStream)",
            per_call_us(environ, iterations),
        ),
        (
            "  of which the params dict copy (bench only: the worker has a fresh dict)",
            per_call_us(copy, iterations),
        ),
        ("app call alone (hello_app, trivial start_response)", per_call_us(app_alone, iterations)),
        ("run_app + response records (environ included)", per_call_us(respond, iterations)),
        (
            f"send ({len(response)} bytes, one socket.send + the reader's recv)",
            per_call_us(send_response, iterations),
        ),
    ]
    a.close()
    b.close()
    print("\n| stage | µs per request |")
    print("| --- | ---: |")
    for name, us in rows:
        print(f"| {name} | {us:.2f} |")


def syscalls(seconds: float, python: str) -> None:
    sock = f"{socket_dir()}/app.sock"
    cmd = [
        python,
        "-m",
        "fcgi_engine",
        "serve",
        f"{HERE}/hello_app.py",
        "--listen",
        sock,
        "--nproc",
        "1",
    ]
    with nginx_front(NGINX, sock=sock) as (_d, port), backend(cmd, sock) as proc:
        wait_port(port)
        (worker,) = workers_of(proc.pid, 20, 1)
        for mode in ("off", "on"):
            wrk(port, f"/{mode}", 1)
            before = cpu_seconds([worker])
            plain = wrk(port, f"/{mode}", seconds)
            plain_cpu = (cpu_seconds([worker]) - before) / plain["requests"] * 1e6
            out = tempfile.mktemp(prefix="fe-strace-")
            tracer = subprocess.Popen(["strace", "-c", "-f", "-p", str(worker), "-o", out])
            time.sleep(0.5)  # strace attaches
            before = cpu_seconds([worker])
            traced = wrk(port, f"/{mode}", seconds)
            traced_cpu = (cpu_seconds([worker]) - before) / traced["requests"] * 1e6
            tracer.terminate()
            tracer.wait(10)
            table = open(out).read()
            os.unlink(out)
            n = traced["requests"]
            print(
                f"\nkeep_conn {mode}: {plain['rps']:.0f} req/s, worker CPU {plain_cpu:.1f} µs/req"
                f" (under strace {traced['rps']:.0f} req/s, {traced_cpu:.1f} µs/req); "
                f"syscalls per request over {n} requests:"
            )
            total = 0.0
            for line in table.splitlines():
                m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
                if m and m.group(2) != "total":
                    per = int(m.group(1)) / n
                    total += per
                    if per >= 0.01:
                        print(f"  {m.group(2):16s} {per:6.2f}")
            print(f"  {'total':16s} {total:6.2f}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--python", default="this")
    parser.add_argument("--skip-strace", action="store_true")
    args = parser.parse_args()
    python = use_python(args.python)
    if not args.skip_strace:
        syscalls(args.seconds, python)
    stages(args.iterations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
