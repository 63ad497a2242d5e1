"""Pidfiles: a pid is our master's only when its command line names fcgi-engine and the pidfile."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from fcgi_engine.system.pidfile import (
    is_our_master,
    process_cmdline,
    read_pidfile,
    write_pidfile,
)


def test_pidfile_identity_needs_our_command_line(tmp_path: Path) -> None:
    pidfile = tmp_path / "x.pid"
    write_pidfile(str(pidfile), os.getpid())
    assert read_pidfile(str(pidfile)) == os.getpid()
    assert not is_our_master(os.getpid(), str(pidfile))  # pytest is not an fcgi-engine master
    # A process whose command line names fcgi-engine and this pidfile, relative to its cwd.
    fake = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", "fcgi-engine", "--pidfile", "x.pid"],
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 5  # the command line appears once exec has finished
        while not process_cmdline(fake.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert is_our_master(fake.pid, str(pidfile))
        assert not is_our_master(fake.pid, str(tmp_path / "other.pid"))
    finally:
        fake.kill()
        fake.wait()
