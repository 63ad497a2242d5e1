"""Rollouts under load: fcgi-engine against uWSGI's reload and chain reload, same run.

    python3 bench/rollout.py [--seconds 20] [--every 3] [--keep-conn on|off|both]
    python3 bench/rollout.py --only fcgi-engine --boot-nice 0 10 19 --runs 5

--boot-nice runs fcgi-engine once per value (FCGI_ENGINE_BOOT_NICE: the autogroup nice a booting
generation runs at; 0 is normal priority), alternating within each of --runs rounds, and ends
with each value's worst-window ratios. --profile shows where the dip falls: the rate in 0.25 s
slices around a rollout. --import-work cpu makes the import compute for 1 s of CPU time (a big
framework) instead of sleeping 1 s (a slow service).

8 keep-alive clients through nginx for SECONDS, a rollout every EVERY seconds to a new release
(behind a switched `current` symlink) of an app that sleeps 1 s at import. Reports failed
requests, the longest interval without a successful response, the worst one-second window of
throughput against the median one, and how long each new version took to serve. Needs nginx
and (for the peers) uwsgi with uwsgi-plugin-python3. Loopback and unix sockets only.
"""

from __future__ import annotations

import argparse
import bisect
import http.client
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import NGINX, stop_group

APP = """
import time
{import_work}
VERSION = "{version}"


def application(environ, start_response):
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    out = ("%s %d" % (VERSION, len(body))).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(out)))])
    return [out]
"""


PROFILE_BIN = 0.25
# What the app's import does for its 1 s: wait (a slow service), or compute (a big framework:
# 1 s of CPU time, as a Django project's import can take).
IMPORT_WORK = {
    "sleep": "time.sleep(1.0)",
    "cpu": "t = time.process_time()\nwhile time.process_time() - t < 1.0:\n    pass",
}
PERL_ENGINE = Path(__file__).resolve().parent / "perl_engine.pl"


def release(site: Path, n: int, import_work: str = "sleep") -> None:
    rel = site / "releases" / str(n)
    rel.mkdir(parents=True)
    (rel / "app.py").write_text(APP.format(version=f"v{n}", import_work=IMPORT_WORK[import_work]))
    # The same release for Perl FCGI::Engine: its script with the version in it.
    perl = PERL_ENGINE.read_text().replace("$ENV{HELLO_VERSION};", f"'v{n}';", 1)
    (rel / "app.pl").write_text(perl.replace("$ENV{BOOT_SECONDS} || 0", "1", 1))
    link = site / "current.new"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(rel)
    os.replace(link, site / "current")


class Load:
    def __init__(self, port: int, path: str, clients: int, seconds: float) -> None:
        self.port, self.path = port, path
        self.stop_at = time.monotonic() + seconds
        self.ok: list[tuple[float, str]] = []
        self.failed: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(clients)]

    def client(self, i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        n = 0
        while time.monotonic() < self.stop_at and n < 2_000_000:
            n += 1
            body = b"x" * (n % 2000) if n % 2 else None
            try:
                conn.request("POST" if body else "GET", self.path, body=body)
                r = conn.getresponse()
                data = r.read().decode(errors="replace")
                version, _, size = data.partition(" ")
                good = r.status == 200 and size == str(len(body or b""))
            except Exception as exc:  # noqa: BLE001 - every failure counts
                good, version, data = False, "", repr(exc)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            now = time.monotonic()
            with self.lock:
                if good:
                    self.ok.append((now, version))
                else:
                    self.failed.append((now, data[:100]))
        conn.close()

    def run(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join()


def summarise(load: Load, rollouts: list[tuple[float, str]], started: float) -> dict:
    times = sorted(t for t, _ in load.ok)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    windows: dict[int, int] = {}
    for t in times:
        windows[int(t - started)] = windows.get(int(t - started), 0) + 1
    full = [windows.get(i, 0) for i in range(1, int(times[-1] - started))] if times else [0]
    median = statistics.median(full) if full else 0
    first_seen: dict[str, float] = {}
    for t, version in sorted(load.ok):
        first_seen.setdefault(version, t)
    takeover = [first_seen[v] - at for at, v in rollouts if v in first_seen]
    # Where the dip falls: throughput in PROFILE_BIN slices around each rollout (from 0.5 s
    # before it), against the median rate, averaged over the rollouts.
    bins = int(3.5 / PROFILE_BIN)
    profile = [0.0] * bins
    for at, _version in rollouts:
        for t in times[bisect.bisect_left(times, at - 0.5) : bisect.bisect_left(times, at + 3.0)]:
            profile[min(int((t - at + 0.5) / PROFILE_BIN), bins - 1)] += 1
    per_bin = median * PROFILE_BIN * max(len(rollouts), 1)
    return {
        "profile": [round(n / per_bin, 2) if per_bin else 0 for n in profile],
        "ok": len(load.ok),
        "failed": len(load.failed),
        "max_gap_ms": max(gaps) * 1000 if gaps else 0,
        "worst_window_ratio": min(full) / median if median else 0,
        "takeover_s": max(takeover) if takeover else None,
        "rolled_out": f"{len(takeover)}/{len(rollouts)}",
        "failures": load.failed[:3],
    }


def run_one(
    name: str,
    d: Path,
    port: int,
    mode: str,
    seconds: float,
    every: float,
    boot_nice: int | None = None,
    import_work: str = "sleep",
) -> dict:
    site = Path(tempfile.mkdtemp(prefix=f"site-{name}-{mode}-", dir=d))
    release(site, 1, import_work)
    sock = d / "app.sock"
    perl_conf = d / "perl-engine.yml"
    if name == "perl-fcgi-engine":
        # FCGI::Engine::Manager's own config and its graceful (start new, then TERM old).
        perl_conf.write_text(
            f"- name: app\n  nproc: 2\n  scriptname: {site / 'current' / 'app.pl'}\n"
            f"  pidfile: {d / 'perl.pid'}\n  socket: {sock}\n"
        )
        manage = [
            "perl",
            "-MFCGI::Engine::Manager",
            "-e",
            "my ($c, $v) = @ARGV; FCGI::Engine::Manager->new(conf => $c)->$v()",
            str(perl_conf),
        ]
        subprocess.run([*manage, "start"], capture_output=True, timeout=60)
        cmd = ["sleep", "3600"]  # the engine daemonizes; this stands in for the process
    elif name == "fcgi-engine":
        cmd = [
            sys.executable,
            "-m",
            "fcgi_engine",
            "serve",
            "app.py",
            "--chdir",
            str(site / "current"),
            "--listen",
            str(sock),
            "--nproc",
            "2",
            "--pidfile",
            str(d / "fe.pid"),
            "--socket-mode",
            "0666",
            "--error-log",
            str(d / "fe.log"),
        ]
    else:
        fifo = d / "uwsgi.fifo"
        cmd = [
            "uwsgi",
            "--plugin",
            "python3",
            "--fastcgi-socket",
            str(sock),
            "--chmod-socket=666",
            "--wsgi-file",
            str(site / "current" / "app.py"),
            "--processes",
            "2",
            "--master",
            "--disable-logging",
            "--master-fifo",
            str(fifo),
            "--die-on-term",
        ]
        if name == "uwsgi-chain":
            cmd.append("--lazy-apps")
    env = dict(os.environ)
    if boot_nice is not None:
        env["FCGI_ENGINE_BOOT_NICE"] = str(boot_nice)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)
        load = Load(port, f"/{mode}", 8, seconds)
        started = time.monotonic()
        load.run()
        rollouts = []
        n = 1
        while time.monotonic() + every < load.stop_at:
            time.sleep(every)
            n += 1
            release(site, n, import_work)
            rollouts.append((time.monotonic(), f"v{n}"))
            if name == "fcgi-engine":
                os.kill(proc.pid, signal.SIGHUP)
            elif name == "perl-fcgi-engine":
                subprocess.Popen(
                    [*manage, "graceful"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            else:
                with open(d / "uwsgi.fifo", "w") as f:
                    f.write("c" if name == "uwsgi-chain" else "r")
        load.join()
        return summarise(load, rollouts, started)
    finally:
        if name == "perl-fcgi-engine":
            subprocess.run([*manage, "stop"], capture_output=True, timeout=60)
        stop_group(proc, 20)
        if sock.exists():
            sock.unlink()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--every", type=float, default=3.0)
    parser.add_argument("--keep-conn", choices=["on", "off", "both"], default="both")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--boot-nice", type=int, nargs="*", default=[])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="show where the dip falls")
    parser.add_argument("--import-work", choices=sorted(IMPORT_WORK), default="sleep")
    args = parser.parse_args()
    d = Path(tempfile.mkdtemp(prefix="fe-roll-"))
    port = 19000 + os.getpid() % 1000
    (d / "nginx.conf").write_text(
        NGINX.format(
            d=d, sock=d / "app.sock", port=port, user="user root;" if os.geteuid() == 0 else ""
        )
    )
    nginx = subprocess.Popen(["nginx", "-c", str(d / "nginx.conf"), "-p", str(d)])
    modes = ["off", "on"] if args.keep_conn == "both" else [args.keep_conn]
    variants: list[tuple[str, int | None]] = []
    for name in ("fcgi-engine", "perl-fcgi-engine", "uwsgi-reload", "uwsgi-chain"):
        if args.only and name not in args.only:
            continue
        if name.startswith("uwsgi") and not shutil.which("uwsgi"):
            continue
        if (
            name.startswith("perl")
            and subprocess.run(
                ["perl", "-MFCGI::Engine::Manager", "-e1"], capture_output=True
            ).returncode
        ):
            continue
        if name == "fcgi-engine" and args.boot_nice:
            variants += [(name, nice) for nice in args.boot_nice]
        else:
            variants.append((name, None))
    ratios: dict[tuple[str, int | None, str], list[float]] = {}
    try:
        for _round in range(args.runs):
            for name, nice in variants:
                for mode in modes:
                    r = run_one(
                        name, d, port, mode, args.seconds, args.every, nice, args.import_work
                    )
                    label = name if nice is None else f"{name} nice {nice}"
                    took = r["takeover_s"]
                    ratios.setdefault((name, nice, mode), []).append(r["worst_window_ratio"])
                    print(
                        f"{label:13s} keep_conn {mode:3s}: {r['ok']:7d} ok, "
                        f"{r['failed']:4d} failed, longest gap {r['max_gap_ms']:7.1f} ms, "
                        f"worst 1-s window {r['worst_window_ratio']:.2f} of median, "
                        f"new version serving after {took if took is None else round(took, 2)}"
                        f" s ({r['rolled_out']} rollouts)",
                        flush=True,
                    )
                    if args.profile:
                        print(
                            f"    rate around a rollout, {PROFILE_BIN:g} s bins from -0.5 s: "
                            + " ".join(f"{v:.2f}" for v in r["profile"])
                        )
                    for failure in r["failures"]:
                        print(f"    failure: {failure}")
        if args.runs > 1:
            for (name, nice, mode), values in ratios.items():
                label = name if nice is None else f"{name} nice {nice}"
                print(
                    f"{label} keep_conn {mode}: worst 1-s window "
                    f"{' '.join(f'{v:.2f}' for v in values)}; median "
                    f"{statistics.median(values):.2f}; >= 0.85 in "
                    f"{sum(v >= 0.85 for v in values)} of {len(values)}"
                )
    finally:
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(10)
        if os.environ.get("KEEP_BENCH_DIR"):
            print(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
