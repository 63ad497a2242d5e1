"""With FCGI_ENGINE_BOOT_NICE, a booting generation imports at a lower CPU priority (its
session's autogroup nice, serving/generation.py's BootPriority) while the serving one keeps
normal priority; once proven, its workers serve at normal priority. Process nice values are
never touched. Without it (the default), a generation boots at normal priority."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.conftest import child_pids, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not os.path.exists("/proc/self/autogroup"), reason="the kernel has no autogroups"
    ),
]

BOOT_NICE = 10
# Each generation's import says it started, then waits for its own gate file, so a test can
# look at it importing.
GATED_APP = """\
import os, time

here = os.path.dirname(os.path.abspath(__file__))
generation = os.environ["FCGI_ENGINE_GENERATION_ID"]
open(os.path.join(here, "importing" + generation), "w").close()
gate = os.path.join(here, "gate" + generation)
deadline = time.monotonic() + 30
while not os.path.exists(gate) and time.monotonic() < deadline:
    time.sleep(0.01)

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""


def autogroup_nice(pid: int) -> int:
    """The nice value of `pid`'s autogroup ("/autogroup-42 nice 10")."""
    with open(f"/proc/{pid}/autogroup") as f:
        return int(f.read().split()[-1])


def process_nice(pid: int) -> int:
    """The nice field (the 19th) of /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def python_for_nobody() -> str:
    from tests.integration.test_manager_trust import python_for

    return python_for("nobody")


@pytest.mark.parametrize("user", [None, "nobody"])
def test_importing_generation_runs_at_lower_priority_until_proven(
    serve, tmp: Path, user: str | None
) -> None:
    if user and os.geteuid() != 0:
        pytest.skip("switching user needs root")
    site = tmp / "site"
    site.mkdir()
    os.chmod(site, 0o777)  # the app's user writes nothing, but reads it
    (site / "app.py").write_text(GATED_APP)
    (site / "gate1").touch()
    extra = ["--user", user, "--python", python_for_nobody()] if user else []
    server = serve(
        str(site / "app.py"),
        *extra,
        "--chdir",
        str(site),
        env={"FCGI_ENGINE_BOOT_NICE": str(BOOT_NICE)},
    )
    first = child_pids(server.pid)
    old_workers = [w for gen in first for w in child_pids(gen)]
    assert len(first) == 1 and len(old_workers) == 2
    # Proven: back to normal (at once as root; as another user the kernel takes one autogroup
    # change per 0.1 s, so a fast boot's restore may come a moment after it serves).
    wait_for(lambda: autogroup_nice(first[0]) == 0, 5, what="generation 1 at normal priority")

    os.kill(server.pid, signal.SIGHUP)
    new = wait_for(
        lambda: [p for p in child_pids(server.pid) if p not in first], what="generation 2"
    )
    importing = new[0]  # type: ignore[index]
    wait_for(lambda: (site / "importing2").exists(), what="generation 2 importing")
    # While it imports (blocked on its gate): its session weighs less; the serving one does not.
    assert autogroup_nice(importing) == BOOT_NICE
    assert process_nice(importing) == 0
    for pid in [*first, *old_workers]:
        assert autogroup_nice(pid) == 0
        assert process_nice(pid) == 0

    (site / "gate2").touch()
    wait_for(lambda: server.status().get("generation") == 2, 20, what="generation 2 serving")
    workers = child_pids(importing)
    assert len(workers) == 2
    # Proven: the generation and its workers (one session) at normal priority.
    wait_for(lambda: autogroup_nice(importing) == 0, 5, what="generation 2 at normal priority")
    for pid in [importing, *workers]:
        assert autogroup_nice(pid) == 0
        assert process_nice(pid) == 0


def test_by_default_a_generation_boots_at_normal_priority(serve, tmp: Path) -> None:
    site = tmp / "site"
    site.mkdir()
    os.chmod(site, 0o777)
    (site / "app.py").write_text(GATED_APP)
    server = serve(str(site / "app.py"), "--chdir", str(site), wait=False)
    generation = wait_for(lambda: child_pids(server.pid), what="generation 1")[0]  # type: ignore[index]
    wait_for(lambda: (site / "importing1").exists(), what="generation 1 importing")
    assert autogroup_nice(generation) == 0
    (site / "gate1").touch()
    wait_for(lambda: os.path.exists(server.pidfile) and server.status().get("generation") == 1)
