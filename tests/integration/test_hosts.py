"""Several hosts (issue 12): fcgi-engine hosts in network namespaces behind one real nginx in a
front namespace, mixed GET/POST load through it (tests/hosts.py), and what an orchestrator does
to them: host-by-host `graceful` gated on `graceful --json` (by a loop here, and by a real
`ansible-playbook` run of examples/ansible), a failing canary, host replacement, TERM racing a
load balancer (drain_delay), TERM with a full backlog, /readyz, CIDR allow-lists, a link going
down. Every load is bounded in clients, requests and seconds; every wait polls with a deadline."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from fcgi_engine.client import ClientError, request
from tests.conftest import ENGINE, ROOT, wait_for
from tests.hosts import (
    APP_PORT,
    NETWORK,
    Fleet,
    Host,
    Load,
    Reply,
    fleet_unavailable,
    in_netns,
    pids_in_namespaces,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def fleet(tmp: Path) -> Iterator[Fleet]:
    why = fleet_unavailable()
    if why:
        pytest.fail(why)
    made = Fleet(tmp)
    try:
        yield made
    finally:
        names = list(made.namespaces)
        made.close()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        left = [n for n in names if n in listed.split()]
        assert not left, f"namespaces left behind: {left}"
        stray = pids_in_namespaces(made.inodes)
        assert not stray, f"processes left in the fleet's namespaces: {stray}"


def by_host(replies: Sequence[Reply], host: Host, version: str | None = None) -> list[Reply]:
    return [r for r in replies if r.host == host.name and (version is None or r.version == version)]


def assert_host_by_host(replies: Sequence[Reply], hosts: Sequence[Host], new: str) -> None:
    """From the replies alone: every host ended on `new`, and host k+1's new release served
    nothing before host k's old release had served its last request."""
    for host in hosts:
        assert by_host(replies, host, new), f"{host.name} never served {new}"
    for earlier, later in zip(hosts, hosts[1:], strict=False):
        last_old = max(r.started for r in by_host(replies, earlier) if r.version != new)
        first_new = min(r.ended for r in by_host(replies, later, new))
        assert first_new > last_old, (
            f"{later.name} served {new} before {earlier.name} had finished its rollout"
        )


def failures(load: Load) -> str:
    failed = load.failed
    return f"{len(failed)} failed of {len(load.replies)}: " + "; ".join(
        f"{r.method} {r.status or r.error[:80]} via {r.upstream or '?'}" for r in failed[:10]
    )


def wait_gone(pid: int, timeout: float) -> None:
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout, what=f"pid {pid} to exit")


def lb_lag(seconds: float) -> None:
    """The load balancer's own delay in the scenario (it learns of a stopping host late):
    time passing is the scenario here, not a wait for a condition."""
    threading.Event().wait(seconds)


def http_get(netns: str, address: str, path: str) -> tuple[int, str, dict[str, str]]:
    """GET http://ADDRESS/PATH from inside `netns`: status, body, headers (lower-case)."""

    def get() -> tuple[int, str, dict[str, str]]:
        host, port = address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read().decode(errors="replace")
            headers = {k.lower(): v for k, v in response.getheaders()}
            return response.status, body, headers
        finally:
            conn.close()

    return in_netns(netns, get)


def fcgi_get(netns: str, address: str, path: str = "/x") -> str:
    """A FastCGI request straight to a host from inside `netns`; the body."""
    response = in_netns(netns, lambda: request(address, path, timeout=5))
    assert response.status == 200, response
    return response.body.decode()


@pytest.mark.parametrize("keep_conn", [False, True], ids=["keep-conn-off", "keep-conn-on"])
def test_host_by_host_graceful_loses_nothing(fleet: Fleet, keep_conn: bool) -> None:
    hosts = [fleet.add_host() for _ in range(3)]
    fleet.start_hosts(hosts)
    fleet.start_front(hosts, keep_conn=keep_conn)
    with Load(fleet.front, clients=8, max_seconds=120) as load:
        load.wait_ok(100)
        for host in hosts:
            # What an orchestrator does: switch, graceful, go on only when the outcome says ok.
            release = host.deploy("v2")
            old = host.status()["generation"]
            code, outcome = host.graceful()
            assert code == 0, outcome
            assert outcome["server"] == "app" and outcome["ok"] is True, outcome
            assert outcome["old_generation"] == old, outcome
            assert outcome["new_generation"] == host.status()["generation"] != old, outcome
            assert outcome["release_dir"] == str(release.resolve()), outcome
            assert outcome["rolled_back"] is False and outcome["error"] is None, outcome
            # The status of a passed check may be unknown to the CLI (null), never another one.
            assert outcome["health"]["path"] == "/healthz", outcome
            assert outcome["health"]["status"] in (200, None), outcome
            assert isinstance(outcome["boot_seconds"], float) and outcome["boot_seconds"] > 0
            load.wait_ok(60)
    assert not load.failed, failures(load)
    assert_host_by_host(load.replies, hosts, "v2")


def test_failing_canary_stops_the_rollout(fleet: Fleet) -> None:
    hosts = [fleet.add_host() for _ in range(3)]
    fleet.start_hosts(hosts)
    fleet.start_front(hosts, keep_conn=True)
    generations = {h.name: h.status()["generation"] for h in hosts}
    rolled: list[Host] = []
    with Load(fleet.front, clients=8, max_seconds=60) as load:
        load.wait_ok(100)
        for host in hosts:
            host.deploy("v2", health_status="500 Internal Server Error")
            code, outcome = host.graceful()
            rolled.append(host)
            if code != 0 or not outcome["ok"]:
                break
        load.wait_ok(60)
    assert rolled == hosts[:1], "the rollout went on past a failed canary"
    assert code == 1, outcome
    assert outcome["ok"] is False and outcome["rolled_back"] is True, outcome
    assert outcome["old_generation"] == generations["h1"], outcome
    assert outcome["health"] == {"path": "/healthz", "status": 500}, outcome
    assert not load.failed, failures(load)
    assert not [r for r in load.replies if r.version == "v2"], "the bad release answered"
    for host in hosts:
        assert host.status()["generation"] == generations[host.name]
        assert {r.version for r in by_host(load.replies, host)} == {"v1"}
    # The canary's old generation still serves, so it is still ready.
    status, body, _ = http_get(fleet.front, hosts[0].status_address, "/readyz")
    assert (status, body) == (200, "ready\n")


def test_host_replacement_loses_nothing(fleet: Fleet) -> None:
    old, keeper = fleet.add_host(), fleet.add_host()
    fleet.start_hosts([old, keeper])
    front = fleet.start_front([old, keeper], keep_conn=True)
    with Load(fleet.front, clients=8, max_seconds=60) as load:
        load.wait_ok(100)
        new = fleet.add_host()
        new.start()
        front.set_upstream([old, keeper, new])
        load.wait_ok(60)
        front.set_upstream([keeper, new])
        pid = old.master_pid()
        stopped = old.cli("stop", "app")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        wait_gone(pid, 30)
        load.wait_ok(60)
    assert not load.failed, failures(load)
    assert by_host(load.replies, new), "the new host served nothing"


@pytest.mark.parametrize("drain_delay", [3, 0])
def test_term_racing_the_load_balancer(fleet: Fleet, drain_delay: int) -> None:
    """The Kubernetes race: the host gets TERM, the load balancer drops it 2 s later. Here the
    balancer does not retry a refused connect (fastcgi_next_upstream off, as a Service does
    not), so only drain_delay covers the gap: with 3 s nothing fails, with 0 the race shows."""
    leaving = fleet.add_host(drain_delay=drain_delay)
    staying = fleet.add_host()
    fleet.start_hosts([leaving, staying])
    front = fleet.start_front([leaving, staying], keep_conn=True, next_upstream="off")
    with Load(fleet.front, clients=8, max_seconds=60) as load:
        load.wait_ok(100)
        pid = leaving.master_pid()
        term_at = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        lb_lag(2)
        front.set_upstream([staying])
        wait_gone(pid, drain_delay + 25)
        load.wait_ok(60)
    if drain_delay:
        assert not load.failed, failures(load)
        served_late = [r for r in by_host(load.replies, leaving) if r.started > term_at + 1]
        assert served_late, "the host stopped serving before its drain_delay ended"
    else:
        assert load.failed, "no request failed: the race was not caught"


def test_term_with_a_full_backlog_resets_nothing(fleet: Fleet) -> None:
    # One worker serving 0.2 s requests, 16 clients: connections queue in its listen backlog.
    busy = fleet.add_host(nproc=1)
    other = fleet.add_host()
    fleet.start_hosts([busy, other])
    front = fleet.start_front([busy, other], keep_conn=False)
    with Load(fleet.front, clients=16, max_seconds=60, path="/slow/0.2") as load:
        load.wait_ok(40)
        pid = busy.master_pid()
        term_at = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid, 30)
        load.wait_ok(20)
    assert not load.failed, failures(load)
    errors = front.error_log()
    assert "reset by peer" not in errors and "prematurely closed" not in errors, errors
    queued = [r for r in by_host(load.replies, busy) if r.started < term_at < r.ended]
    assert len(queued) > 1, "no request was queued on the host at TERM"


def test_readyz_timings(fleet: Fleet) -> None:
    host = fleet.add_host(drain_delay=2)
    host.deploy("v1-slow", import_sleep=1.5)
    seen: list[int | None] = []
    starting = threading.Thread(target=host.start)
    starting.start()
    try:

        def readyz() -> int | None:
            try:
                status = http_get(fleet.front, host.status_address, "/readyz")[0]
            except OSError:
                status = None
            seen.append(status)
            return status

        wait_for(lambda: readyz() == 200, 30, interval=0.05, what="/readyz 200")
    finally:
        starting.join(60)
    assert 503 in seen, f"/readyz was never 503 while the generation booted: {seen}"
    assert fcgi_get(fleet.front, host.address).startswith("h1 v1-slow ")
    assert host.cli("status", "app", "--ready").returncode == 0

    # Ready throughout a graceful rollout: the old generation serves until the new is proven.
    host.deploy("v2", import_sleep=1.0)
    during: list[int] = []
    rolling = threading.Event()

    def watch() -> None:
        while not rolling.is_set():
            during.append(http_get(fleet.front, host.status_address, "/readyz")[0])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        code, outcome = host.graceful()
    finally:
        rolling.set()
        watcher.join(30)
    assert code == 0 and outcome["ok"], outcome
    assert during and set(during) == {200}, during

    status, body, headers = http_get(fleet.front, host.status_address, "/status")
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert '"ready": true' in body.replace('"ready":true', '"ready": true')
    assert http_get(fleet.front, host.status_address, "/livez")[:2] == (200, "ok\n")
    assert http_get(fleet.front, host.status_address, "/nope")[0] == 404

    # TERM: not ready at once, still serving for drain_delay, then refused, then gone.
    pid = host.master_pid()
    term_at = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    wait_for(
        lambda: http_get(fleet.front, host.status_address, "/readyz")[0] == 503,
        1.0,
        interval=0.02,
        what="/readyz 503 after TERM",
    )
    status, body, _ = http_get(fleet.front, host.status_address, "/readyz")
    assert status == 503 and body.startswith("not ready: "), body
    assert http_get(fleet.front, host.status_address, "/livez")[0] == 200
    assert fcgi_get(fleet.front, host.address).startswith("h1 v2 ")
    assert host.cli("status", "app", "--ready").returncode == 1
    assert time.monotonic() - term_at < 2, "the checks above outlasted the drain_delay"

    def refused() -> bool:
        try:
            fcgi_get(fleet.front, host.address)
        except ClientError:
            return True
        return False

    wait_for(refused, 10, interval=0.05, what="the listener to close")
    assert time.monotonic() - term_at >= 1.8, "the listener closed before drain_delay ended"
    wait_gone(pid, 25)
    assert host.cli("status", "app", "--ready").returncode == 3


def test_cidr_allow_list_admits_the_front_and_refuses_another_network(fleet: Fleet) -> None:
    # h1 listens on every address, 198.18.0.11 and 198.20.0.11; only 198.18.0.0/15 may talk.
    listening = fleet.add_host(
        extra_addrs=["198.20.0.11/24"], socket=f"0.0.0.0:{APP_PORT}", allowed_addrs=NETWORK
    )
    # h2 has no allow-list on a non-loopback address: loopback peers only, and it says so.
    closed = fleet.add_host(allowed_addrs=None)
    outsider = fleet.add_node("ot", ["198.20.0.1/24"])
    fleet.start_hosts([listening, closed])
    assert fcgi_get(fleet.front, listening.address).startswith("h1 v1 ")
    with pytest.raises(ClientError):
        fcgi_get(outsider, f"198.20.0.11:{APP_PORT}")
    with pytest.raises(ClientError):
        fcgi_get(fleet.front, closed.address)
    log = closed.log()
    assert "loopback" in log and "allowed_addrs" in log, log


def test_a_host_link_going_down_fails_only_its_in_flight_requests(fleet: Fleet) -> None:
    hosts = [fleet.add_host() for _ in range(3)]
    fleet.start_hosts(hosts)
    # keep-conn off: a request not yet sent is retried elsewhere after the 1 s connect timeout;
    # one already sent to the lost host waits out the read timeout (3 s) and fails.
    fleet.start_front(hosts, keep_conn=False, read_timeout=3)
    lost = hosts[1]
    with Load(fleet.front, clients=8, max_seconds=60, path="/slow/0.05") as load:
        load.wait_ok(100)
        down_at = time.monotonic()
        subprocess.run(["ip", "-n", lost.netns, "link", "set", "eth0", "down"], check=True)
        load.wait_ok(150, timeout=30)
    assert [r for r in by_host(load.replies, lost) if r.started < down_at], "h2 served nothing"
    late = [r for r in load.failed if r.started > down_at]
    assert not late, "requests sent after the link went down failed: " + failures(load)
    assert len(load.failed) <= 8, failures(load)
    assert all(r.upstream == lost.address for r in load.failed), failures(load)
    assert not [r for r in by_host(load.replies, lost) if r.started > down_at + 0.1]


def ansible_playbook(fleet: Fleet, playbook: str, hosts: Sequence[Host], **extra: str) -> str:
    """Run examples/ansible/PLAYBOOK against the namespace hosts (connection local, each
    fcgi-engine call wrapped in `ip netns exec`); returns its output, asserting nothing."""
    binary = Path(sys.executable).parent / "ansible-playbook"
    found = str(binary) if binary.exists() else shutil.which("ansible-playbook")
    if found is None:
        pytest.fail("ansible-playbook is not installed: pip install -e '.[test]' installs it")
    engine = " ".join(ENGINE)
    lines = ["[fcgi_engine_hosts]"]
    for host in hosts:
        release = host.site / "releases" / "v2"
        lines.append(
            f"{host.name} ansible_connection=local ansible_python_interpreter={sys.executable}"
            f' fcgi_engine_cmd="ip netns exec {host.netns} {engine}"'
            f" fcgi_engine_config={host.config} fcgi_engine_server=app"
            f" fcgi_upstream_addr={host.address}"
            f" fcgi_release_dir={release} fcgi_current_link={host.site / 'current'}"
        )
    adir = fleet.root / "ansible"
    adir.mkdir(exist_ok=True)
    inventory = adir / "inventory.ini"
    inventory.write_text("\n".join(lines) + "\n")
    env = dict(
        fleet.env(),
        ANSIBLE_HOME=str(adir),
        ANSIBLE_LOCAL_TEMP=str(adir / "tmp"),
        ANSIBLE_REMOTE_TEMP=str(adir / "tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        ANSIBLE_STDOUT_CALLBACK="default",
        LC_ALL="C.UTF-8",
    )
    args = [a for key, value in extra.items() for a in ("-e", f"{key}={value}")]
    for host in hosts:
        host.write_config()
    done = subprocess.run(
        [found, "-i", str(inventory), str(ROOT / "examples" / "ansible" / playbook), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    return f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"


def test_ansible_rolls_out_three_hosts(fleet: Fleet) -> None:
    hosts = [fleet.add_host() for _ in range(3)]
    fleet.start_hosts(hosts)
    fleet.start_front(hosts, keep_conn=True)
    for host in hosts:
        host.release("v2")
    with Load(fleet.front, clients=8, max_seconds=150) as load:
        load.wait_ok(100)
        output = ansible_playbook(fleet, "rolling-graceful.yml", hosts)
        load.wait_ok(60)
    assert output.startswith("exit 0\n"), output
    assert not load.failed, failures(load)
    assert_host_by_host(load.replies, hosts, "v2")


def test_ansible_stops_at_a_failing_canary(fleet: Fleet) -> None:
    hosts = [fleet.add_host() for _ in range(3)]
    fleet.start_hosts(hosts)
    fleet.start_front(hosts, keep_conn=True)
    hosts[0].release("v2", health_status="503 Service Unavailable")
    for host in hosts[1:]:
        host.release("v2")
    generations = {h.name: h.status()["generation"] for h in hosts}
    with Load(fleet.front, clients=8, max_seconds=120) as load:
        load.wait_ok(100)
        output = ansible_playbook(fleet, "rolling-graceful.yml", hosts)
        load.wait_ok(60)
    assert not output.startswith("exit 0\n"), output
    assert not load.failed, failures(load)
    assert not [r for r in load.replies if r.version == "v2"], "a new release answered"
    for host in hosts:
        assert host.status()["generation"] == generations[host.name], output
    # The hosts after the canary were never touched, and the canary's link was put back: every
    # current link names v1, the release that serves (a restart boots what serves).
    for host in hosts:
        assert (host.site / "current").resolve().name == "v1", output
