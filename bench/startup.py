"""Start-up: how long from a command to the app answering, for an app whose import takes 1 s.

    python3 bench/startup.py [--rounds 5] [--import-seconds 1.0] [--trees SRC ...]

--trees compares source trees in the same run (each a directory holding the fcgi_engine
package, put first on PYTHONPATH; "installed" is the installed one), alternating in each round.

Three clocks, each the median of ROUNDS (the rounds alternate the three, so noise falls on
each alike), with the spread:
- `serve`: from launching `fcgi-engine serve app.py --listen SOCK --nproc 2` to the first
  answered request on SOCK;
- `start`: from launching `fcgi-engine -c YAML start` to the first answered request, and to
  the command's exit (it returns once the server is ready);
- `graceful`: from launching `fcgi-engine -c YAML graceful` (a new release behind a switched
  `current` symlink) to the first answer from the new version, and to the command's exit.
The floor is the import itself: the target (issue 11, item 7) is within 0.3 s of it.
Requests go straight to the FastCGI socket (fcgi_engine.client), polled every 2 ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import stop_group

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from fcgi_engine.client import ClientError, request  # noqa: E402

APP = """
import time
time.sleep({seconds})
VERSION = "{version}"


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [VERSION.encode()]
"""
POLL_SECONDS = 0.002


def release(site: Path, n: int, seconds: float) -> None:
    rel = site / "releases" / str(n)
    rel.mkdir(parents=True)
    (rel / "app.py").write_text(APP.format(seconds=seconds, version=f"v{n}"))
    link = site / "current.new"
    link.symlink_to(rel)
    os.replace(link, site / "current")


def first_answer(sock: Path, version: str, started: float, limit: float = 30.0) -> float:
    """Seconds from `started` until `sock` answers with `version` (inf past `limit`)."""
    while time.monotonic() - started < limit:
        try:
            if request(str(sock), "/", timeout=5).body.decode() == version:
                return time.monotonic() - started
        except (ClientError, OSError):
            pass
        time.sleep(POLL_SECONDS)
    return float("inf")


def environment(tree: str) -> dict[str, str]:
    env = dict(os.environ)
    if tree != "installed":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (tree, env.get("PYTHONPATH")) if p)
    return env


def cli(config: Path, tree: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "fcgi_engine", "-c", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=environment(tree),
    )


def timed(config: Path, tree: str, sock: Path, version: str, verb: str) -> tuple[float, float]:
    """(seconds to the first answer from `version`, seconds to the command's exit)."""
    answered: list[float] = []
    started = time.monotonic()
    proc = cli(config, tree, verb)
    poller = threading.Thread(target=lambda: answered.append(first_answer(sock, version, started)))
    poller.start()
    out = proc.communicate(timeout=60)[0]
    exited = time.monotonic() - started
    poller.join()
    if proc.returncode:
        raise SystemExit(f"{verb} failed: {out.decode(errors='replace')}")
    return answered[0], exited


def serve(d: Path, tree: str, seconds: float) -> float:
    site = d / "serve-site"
    shutil.rmtree(site, ignore_errors=True)
    release(site, 1, seconds)
    sock = d / "serve.sock"
    started = time.monotonic()
    proc = subprocess.Popen(
        [
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
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=environment(tree),
    )
    try:
        return first_answer(sock, "v1", started)
    finally:
        stop_group(proc, 20)


def yaml_round(d: Path, tree: str, seconds: float) -> tuple[float, float, float, float]:
    """start (answer, exit) then graceful (answer, exit), then stop."""
    site = d / "yaml-site"
    shutil.rmtree(site, ignore_errors=True)
    release(site, 1, seconds)
    sock = d / "yaml.sock"
    config = d / "fcgi-engine.yml"
    config.write_text(
        f"- name: startup\n  app: app.py\n  chdir: {site / 'current'}\n  nproc: 2\n"
        f"  socket: {sock}\n  pidfile: {d / 'startup.pid'}\n"
    )
    try:
        start = timed(config, tree, sock, "v1", "start")
        release(site, 2, seconds)
        graceful = timed(config, tree, sock, "v2", "graceful")
    finally:
        subprocess.run(
            [sys.executable, "-m", "fcgi_engine", "-c", str(config), "stop"],
            capture_output=True,
            timeout=60,
            env=environment(tree),
        )
    return (*start, *graceful)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--import-seconds", type=float, default=1.0)
    parser.add_argument("--trees", nargs="*", default=["installed"])
    args = parser.parse_args()
    d = Path(tempfile.mkdtemp(prefix="fe-startup-"))
    names = [
        "serve -> first answer",
        "start -> first answer",
        "start -> command exits",
        "graceful -> new version answers",
        "graceful -> command exits",
    ]
    results: dict[tuple[str, str], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for tree in args.trees:
                results.setdefault((tree, names[0]), []).append(serve(d, tree, args.import_seconds))
                values = yaml_round(d, tree, args.import_seconds)
                for name, value in zip(names[1:], values, strict=True):
                    results.setdefault((tree, name), []).append(value)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"import takes {args.import_seconds:g} s; median of {args.rounds} (spread)")
    for (tree, name), values in results.items():
        median = statistics.median(values)
        print(
            f"{tree:10s} {name:32s} {median:6.2f} s  (+{median - args.import_seconds:.2f} s "
            f"over the import; {min(values):.2f}-{max(values):.2f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
