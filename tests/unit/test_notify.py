"""The sd_notify client against real AF_UNIX datagram sockets (a path and an abstract name), and
the reporter that maps the master's states onto notifications."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fcgi_engine.system.notify import (
    MAX_STATUS,
    Notifier,
    RolloutOutcome,
    ServiceReporter,
    ServiceState,
    child_environment,
    monotonic_usec,
    one_line,
    socket_address,
)


def receive_all(sock: socket.socket) -> list[str]:
    """Every datagram waiting on `sock` (sends are synchronous on AF_UNIX: they are there)."""
    got = []
    while True:
        try:
            got.append(sock.recv(65536, socket.MSG_DONTWAIT).decode())
        except BlockingIOError:
            return got


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for systemd, and its $NOTIFY_SOCKET value."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        yield sock, path


def test_sends_one_datagram_per_notification_to_a_path(
    receiver: tuple[socket.socket, str],
) -> None:
    sock, path = receiver
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.notify("READY=1", "STATUS=all good")
    assert notifier.notify("STOPPING=1")
    notifier.close()
    assert receive_all(sock) == ["READY=1\nSTATUS=all good", "STOPPING=1"]


def test_abstract_socket_name() -> None:
    name = f"fcgi-engine-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})
        assert notifier.address == b"\0" + name.encode()
        assert notifier.notify("READY=1")
        notifier.close()
        assert receive_all(sock) == ["READY=1"]


def test_without_notify_socket_nothing_is_sent_or_opened() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert not notifier.notify("READY=1")
    assert notifier.watchdog_interval is None


@pytest.mark.parametrize("value", ["relative/path", "@", "notify.sock"])
def test_unusable_addresses_are_ignored(value: str) -> None:
    assert socket_address(value) is None
    assert not Notifier.from_environment({"NOTIFY_SOCKET": value}).enabled


def test_a_manager_that_is_gone_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = str(tmp_path / "gone")
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    with caplog.at_level(logging.WARNING, logger="fcgi_engine.master"):
        assert not notifier.notify("READY=1")
        assert not notifier.notify("STATUS=still nobody")
        # A socket bound and closed again: connection refused, the same silence.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
        assert not notifier.notify("STOPPING=1")
    notifier.close()
    complaints = [r for r in caplog.records if "service manager" in r.getMessage()]
    assert len(complaints) == 1
    assert path in complaints[0].getMessage()


def test_a_full_queue_does_not_block(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """systemd that stopped reading: sends fail at once (EAGAIN) instead of stalling the master."""
    path = str(tmp_path / "slow")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        notifier = Notifier(path)
        results = []
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="fcgi_engine.master"):
            for _ in range(2000):  # far beyond a datagram queue (max_dgram_qlen is 512)
                results.append(notifier.notify("STATUS=" + "x" * 100))
        assert time.monotonic() - started < 5
        assert results[0] and not results[-1]
        assert len([r for r in caplog.records if "service manager" in r.getMessage()]) == 1
        notifier.close()


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "200000"}
    assert Notifier.from_environment(env).watchdog_interval == pytest.approx(0.1)
    ours = dict(env, WATCHDOG_PID=str(os.getpid()))
    assert Notifier.from_environment(ours).watchdog_interval == pytest.approx(0.1)
    # Meant for another process (the one that exec'd us), or nonsense: no watchdog.
    assert Notifier.from_environment(dict(env, WATCHDOG_PID="1")).watchdog_interval is None
    assert Notifier.from_environment(dict(env, WATCHDOG_USEC="x")).watchdog_interval is None
    assert Notifier.from_environment(dict(env, WATCHDOG_USEC="0")).watchdog_interval is None


def test_child_environment_drops_the_managers_variables() -> None:
    env = {
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "1",
        "WATCHDOG_PID": "1",
        "PATH": "/bin",
    }
    assert child_environment(env) == {"PATH": "/bin"}
    assert env == {"PATH": "/bin"}


def test_one_line_keeps_the_first_line_and_bounds_it() -> None:
    assert one_line("\n  first line \nsecond") == "first line"
    long = one_line("x" * 1000)
    assert len(long) == MAX_STATUS and long.endswith("...")


def test_monotonic_usec_is_clock_monotonic() -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    value = monotonic_usec()
    assert before <= value <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# ---------------------------------------------------------------- the reporter


def state(**kw: object) -> ServiceState:
    values: dict[str, object] = dict(ready=True, serving=1, booting=None, stopping=False)
    values.update(kw)
    return ServiceState(**values)  # type: ignore[arg-type]


@pytest.fixture
def reporter(receiver: tuple[socket.socket, str]) -> Iterator[ServiceReporter]:
    notifier = Notifier(receiver[1])
    yield ServiceReporter(notifier, status_interval=2.0)
    notifier.close()


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.split("\n"))


def test_ready_only_once_the_first_generation_serves(
    reporter: ServiceReporter, receiver: tuple[socket.socket, str]
) -> None:
    sock = receiver[0]
    reporter.observe(state(ready=False, serving=None, booting=1), 0.0)
    assert receive_all(sock) == []
    reporter.observe(state(workers=2), 0.1)
    reporter.observe(state(workers=2), 0.2)
    (ready,) = receive_all(sock)
    assert fields(ready) == {
        "READY": "1",
        "MAINPID": str(os.getpid()),
        "STATUS": "generation 1: 2 workers (0 busy), 0 requests",
    }


def test_a_rollout_is_reloading_then_ready_with_its_outcome(
    reporter: ServiceReporter, receiver: tuple[socket.socket, str]
) -> None:
    sock = receiver[0]
    reporter.observe(state(), 0.0)
    receive_all(sock)
    reporter.observe(state(booting=2), 1.0)
    reporter.observe(state(booting=2), 1.1)
    (reloading,) = receive_all(sock)
    assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=")
    usec = int(fields(reloading)["MONOTONIC_USEC"])
    assert abs(usec - monotonic_usec()) < 5_000_000
    reporter.observe(state(serving=2, last_boot=RolloutOutcome(2, True)), 2.0)
    assert receive_all(sock) == ["READY=1\nSTATUS=rolled out to generation 2"]
    # A release that fails: rolled back, with the first line of its error.
    reporter.observe(state(serving=2, booting=3), 3.0)
    reporter.observe(
        state(serving=2, last_boot=RolloutOutcome(3, False, "ImportError: no\nTraceback...")),
        4.0,
    )
    messages = receive_all(sock)
    assert messages[0].startswith("RELOADING=1\n")
    assert messages[1] == "READY=1\nSTATUS=rolled back: ImportError: no"


def test_a_queued_rollout_ends_the_first_and_starts_the_next(
    reporter: ServiceReporter, receiver: tuple[socket.socket, str]
) -> None:
    sock = receiver[0]
    reporter.observe(state(), 0.0)
    reporter.observe(state(booting=2), 1.0)
    receive_all(sock)
    # Generation 2 became ready and 3 (a HUP during 2's boot) boots, in one decision.
    reporter.observe(state(serving=2, booting=3, last_boot=RolloutOutcome(2, True)), 2.0)
    messages = receive_all(sock)
    assert messages[0] == "READY=1\nSTATUS=rolled out to generation 2"
    assert messages[1].startswith("RELOADING=1\n") and "generation 3" in messages[1]


def test_stopping_once_and_nothing_after(
    reporter: ServiceReporter, receiver: tuple[socket.socket, str]
) -> None:
    sock = receiver[0]
    reporter.observe(state(), 0.0)
    reporter.observe(state(booting=2), 1.0)
    receive_all(sock)
    # A stop during a rollout: the boot is cut short, which is no rollback to report.
    stopping = state(stopping=True, last_boot=RolloutOutcome(2, False, "the server is stopping"))
    reporter.observe(stopping, 2.0)
    reporter.observe(stopping, 9.0)
    assert receive_all(sock) == ["STOPPING=1\nSTATUS=stopping"]


def test_a_first_boot_that_fails_says_why(
    reporter: ServiceReporter, receiver: tuple[socket.socket, str]
) -> None:
    failed = RolloutOutcome(1, False, "importing app.py failed: SyntaxError\n  File ...")
    reporter.observe(state(ready=False, serving=None, stopping=True, last_boot=failed), 0.0)
    assert receive_all(receiver[0]) == [
        "STOPPING=1\nSTATUS=failed to start: importing app.py failed: SyntaxError"
    ]


def test_status_lines_follow_changes_at_most_every_interval(
    reporter: ServiceReporter, receiver: tuple[socket.socket, str]
) -> None:
    sock = receiver[0]
    reporter.observe(state(workers=2), 0.0)
    receive_all(sock)
    reporter.observe(state(workers=2, busy=1, requests=5), 0.5)  # too soon after READY
    assert receive_all(sock) == []
    reporter.observe(state(workers=2, busy=1, requests=7), 2.5)
    assert receive_all(sock) == ["STATUS=generation 1: 2 workers (1 busy), 7 requests"]
    reporter.observe(state(workers=2, busy=1, requests=7), 9.0)  # unchanged: nothing
    assert receive_all(sock) == []


def test_after_a_reexec_ready_again_with_mainpid(receiver: tuple[socket.socket, str]) -> None:
    notifier = Notifier(receiver[1])
    reporter = ServiceReporter(notifier, reexecuted=True)
    reporter.observe(state(serving=4, workers=3), 0.0)
    notifier.close()
    (message,) = receive_all(receiver[0])
    assert fields(message)["READY"] == "1"
    assert fields(message)["MAINPID"] == str(os.getpid())
    assert fields(message)["STATUS"].startswith("master re-executed in place; generation 4")


def test_watchdog_pings_at_its_interval(receiver: tuple[socket.socket, str]) -> None:
    notifier = Notifier(receiver[1], watchdog_interval=0.1)
    reporter = ServiceReporter(notifier)
    for now in (0.0, 0.05, 0.1, 0.15, 0.2):
        reporter.watchdog(now)
    assert reporter.seconds_to_watchdog(0.25) == pytest.approx(0.05)
    notifier.close()
    assert receive_all(receiver[0]) == ["WATCHDOG=1"] * 3
