"""The manager's speed: `start` of 4 servers (nproc 4, an app that takes 1 s to import) against
the slowest single boot, and `status` of 20 running servers.

    python3 bench/manager.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

APP = (
    "import time\ntime.sleep(1.0)\n\n"
    "def application(e, s):\n    s('200 OK', [])\n    return [b'ok']\n"
)


def config(d: Path, count: int, nproc: int) -> Path:
    (d / "slow.py").write_text(APP)
    text = "".join(
        f"- name: s{i}\n  app: {d}/slow.py\n  nproc: {nproc}\n  socket: {d}/s{i}.sock\n"
        f"  pidfile: {d}/s{i}.pid\n"
        for i in range(count)
    )
    path = d / f"c{count}.yml"
    path.write_text(text)
    return path


def cli(path: Path, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "fcgi_engine", "-c", str(path), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return time.monotonic() - started, r


def main() -> int:
    d = Path(tempfile.mkdtemp(prefix="fe-mgr-"))
    try:
        one = config(d, 1, 4)
        took_one, r = cli(one, "start")
        assert r.returncode == 0, r.stdout + r.stderr
        cli(one, "stop")
        four = config(d, 4, 4)
        took_four, r = cli(four, "start")
        assert r.returncode == 0, r.stdout + r.stderr
        print(f"start 1 server (nproc 4):  {took_one:.2f} s")
        print(
            f"start 4 servers (nproc 4): {took_four:.2f} s ({took_four / took_one:.2f}x one server)"
        )
        cli(four, "stop")
        twenty = config(d, 20, 1)
        r = cli(twenty, "start")[1]
        assert r.returncode == 0, r.stdout + r.stderr
        times = []
        for _ in range(5):
            took, r = cli(twenty, "status")
            assert r.returncode == 0 and r.stdout.count("running") == 20
            times.append(took)
        in_process = []
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from fcgi_engine import manager
        from fcgi_engine.config.loader import load_config

        servers = load_config(str(twenty))
        for _ in range(5):
            started = time.monotonic()
            outcomes = manager.status(servers)
            in_process.append(time.monotonic() - started)
            assert all(o.ok for o in outcomes)
        print(
            f"status of 20 servers: {min(times) * 1000:.0f} ms best of 5 as a command "
            f"(interpreter start included), {min(in_process) * 1000:.0f} ms in process"
        )
        cli(twenty, "stop")
    finally:
        for c in d.glob("c*.yml"):
            subprocess.run(
                [sys.executable, "-m", "fcgi_engine", "-c", str(c), "stop", "--fast"],
                capture_output=True,
                timeout=120,
            )
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
