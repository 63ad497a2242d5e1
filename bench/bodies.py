"""Big bodies through nginx (issue 11, item 3): a 1 MB and a 100 MB response and a 100 MB
upload, fcgi-engine against uWSGI (FastCGI, and its own protocol), same run: MB/s and the
workers' peak RSS.

    python3 bench/bodies.py [--rounds 3] [--seconds 5] [--python this|debian|PATH]

The app is bench/apps/bodies_app.py (64 KiB pieces out, 64 KiB reads in), nproc 2, FastCGI
with fastcgi_keep_conn on (an upstream keepalive pool). 1 MB: wrk -t2 -c4 for `seconds`,
MB/s = req/s x 1 MiB. 100 MB: `curl -o /dev/null` three times in a row, and an upload of a
100 MiB file (`curl --data-binary @file`, nginx buffers it to its temp file first, as it does
by default) three times; MB/s = 100 MiB / curl's total time, the median of the three.
Peak RSS is each worker's VmHWM after everything, against its VmRSS after boot. The peers run
in a different order every round.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from common import (
    NGINX_PEERS,
    backend,
    median,
    nginx_front,
    peer_command,
    peer_prefix,
    socket_dir,
    use_python,
    wait_port,
    workers_of,
    wrk,
)
from realapps import APPS

MIB = 1 << 20
PEERS = ("fcgi-engine", "uwsgi-fcgi", "uwsgi")


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def curl_seconds(url: str, upload: str | None = None) -> float:
    """curl's total time for one transfer (the answer checked for a 200)."""
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", url]
    if upload:
        cmd[1:1] = ["--data-binary", f"@{upload}", "-H", "Content-Type: application/octet-stream"]
    code, seconds = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    if code != "200":
        raise SystemExit(f"{url}: HTTP {code}")
    return float(seconds)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=PEERS)
    parser.add_argument("--python", default="this")
    args = parser.parse_args()
    python = use_python(args.python)
    peers = [p for p in PEERS if not args.only or p in args.only]
    if not shutil.which("uwsgi"):
        peers = [p for p in peers if not p.startswith("uwsgi")]
    upload = tempfile.NamedTemporaryFile(prefix="fe-bench-upload-", delete=False)
    with upload:
        piece = os.urandom(MIB)
        for _ in range(100):
            upload.write(piece)
    results: dict[tuple[str, str], list[float]] = {}
    try:
        sock = f"{socket_dir()}/app.sock"
        with nginx_front(NGINX_PEERS, sock=sock) as (_d, port):
            wait_port(port)
            for round_no in range(args.rounds):
                for peer in peers if round_no % 2 == 0 else peers[::-1]:
                    cmd = peer_command(
                        peer, sock, args.nproc, str(APPS), "bodies_app", python=python
                    )
                    with backend(cmd, sock) as proc:
                        workers = workers_of(proc.pid, 20, args.nproc)
                        booted = [status_kib(p, "VmRSS") for p in workers]
                        base = f"http://127.0.0.1:{port}{peer_prefix(peer)}"
                        one = wrk(port, peer_prefix(peer) + "/1mb", args.seconds, 2, 4)
                        if one["errors"]:
                            raise SystemExit(f"{peer} /1mb: {one['errors']} errors")
                        rates = {
                            "1 MB response": one["rps"],
                            "100 MB response": 100
                            / median([curl_seconds(base + "/100mb") for _ in range(3)]),
                            "100 MB upload": 100
                            / median(
                                [curl_seconds(base + "/upload", upload.name) for _ in range(3)]
                            ),
                        }
                        peak = [status_kib(p, "VmHWM") for p in workers]
                    for what, rate in rates.items():
                        results.setdefault((peer, what), []).append(rate)
                    growth = max(p - b for p, b in zip(peak, booted, strict=True))
                    results.setdefault((peer, "peak RSS growth"), []).append(growth / 1024)
                    print(
                        f"round {round_no + 1} {peer:11s} "
                        + "  ".join(f"{w} {r:7.1f} MB/s" for w, r in rates.items())
                        + f"  worker RSS after boot {'/'.join(str(b // 1024) for b in booted)}"
                        f" MiB, peak {'/'.join(str(p // 1024) for p in peak)} MiB",
                        flush=True,
                    )
    finally:
        os.unlink(upload.name)
    print("\n| backend | what | median | rounds | fcgi-engine / it |")
    print("| --- | --- | ---: | --- | ---: |")
    for (peer, what), values in results.items():
        ours = results.get(("fcgi-engine", what))
        unit = "MiB" if what == "peak RSS growth" else "MB/s"
        ratio = ""
        if ours and peer != "fcgi-engine" and unit == "MB/s":
            ratio = f"**{median(ours) / median(values):.2f}**"
        print(
            f"| {peer} | {what} | {median(values):.1f} {unit} "
            f"| {' / '.join(f'{v:.1f}' for v in values)} | {ratio} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
