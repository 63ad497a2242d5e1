"""A small HTTP load generator for the demo: N keep-alive clients, GETs and POSTs, every answer
checked; prints what it saw. Bounded in time and in count; loopback only."""

from __future__ import annotations

import argparse
import http.client
import threading
import time
from collections import Counter


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    ok = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + min(args.seconds, 120.0)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=30)
        for n in range(1_000_000):
            if time.monotonic() > deadline:
                break
            body = b"x" * (n % 4096) if n % 2 else None
            try:
                conn.request("POST" if body else "GET", args.path, body=body)
                response = conn.getresponse()
                data = response.read()
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                with lock:
                    failures.append(f"client {i}: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=30)
                continue
            text = data.decode(errors="replace")
            if response.status != 200 or (body and f"{len(body)} bytes in" not in text
                                          and "perl" not in text):
                with lock:
                    failures.append(f"client {i}: HTTP {response.status} {text[:80]!r}")
                continue
            with lock:
                ok[text.split(", pid")[0].strip()] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(ok.values())
    print(f"load: {total} requests answered, {len(failures)} failed "
          f"({args.clients} keep-alive clients, {args.seconds:g} s)")
    for version, count in ok.items():
        print(f"load:   {count:6d} x {version}")
    for line in failures[:10]:
        print(f"load:   FAILED {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
