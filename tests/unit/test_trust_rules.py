"""The pure parts behind the trust guarantees: respawn rules, heartbeats, body spooling, the
allow-list, and a broken connection that must not keep its buffers alive."""

from __future__ import annotations

import gc
import signal
import weakref

import pytest

from fcgi_engine.config.address import LOOPBACK, AddressError, AllowList
from fcgi_engine.protocol import Connection, ProtocolError
from fcgi_engine.serving.body import InputStream, SpooledBody
from fcgi_engine.serving.scoreboard import Scoreboard
from fcgi_engine.serving.slots import CRASH_MAX, KILLED_MAX, Death, Slot, after_death, due


def test_a_worker_that_served_and_was_killed_is_replaced_at_once() -> None:
    slot = Slot(0, pid=10, started=0.0)
    for n in range(10):
        assert after_death(slot, Death(-signal.SIGKILL, lived=2.0, served=5), now=n) == 0.0
        slot.pid = 11
    assert slot.failures == 0


def test_an_old_worker_killed_before_serving_is_replaced_at_once() -> None:
    slot = Slot(0, pid=10)
    assert after_death(slot, Death(-signal.SIGKILL, lived=60.0, served=0), now=60) == 0.0


def test_young_kills_from_outside_back_off_at_most_a_second() -> None:
    slot = Slot(0, pid=10)
    delays = [after_death(slot, Death(-signal.SIGKILL, 0.1, 0), now=n) for n in range(12)]
    assert delays[:2] == [0.0, 0.0]
    assert max(delays) == KILLED_MAX
    assert not slot.crashed


def test_a_crash_loop_backs_off_up_to_its_cap() -> None:
    slot = Slot(0, pid=10)
    delays = [after_death(slot, Death(1, 0.1, 0), now=n) for n in range(12)]
    assert delays[0] == 0.0
    assert delays == sorted(delays)
    assert delays[-1] == CRASH_MAX
    assert slot.crashed
    # A segfault is a crash of its own too.
    segv = Slot(1, pid=11)
    after_death(segv, Death(-signal.SIGSEGV, 0.1, 0), now=0)
    assert segv.crashed
    # A clean exit resets everything.
    assert after_death(slot, Death(0, 0.1, 0), now=20) == 0.0 and slot.failures == 0


def test_an_empty_pool_is_refilled_at_once_unless_every_slot_crash_loops() -> None:
    killed = Slot(0, respawn_at=10.0)
    crashing = Slot(1, respawn_at=8.0, crashed=True)
    assert due([killed, crashing], now=5.0, last_spawn=0.0) == [killed]
    # Not faster than the minimum interval.
    assert due([killed, crashing], now=5.0, last_spawn=4.99) == []
    # With a live worker the back-off stands.
    live = Slot(2, pid=99)
    assert due([killed, live], now=5.0, last_spawn=0.0) == []
    # Only crash-loopers: they wait out their back-off.
    assert due([crashing], now=5.0, last_spawn=0.0) == []
    assert due([crashing], now=8.0, last_spawn=0.0) == [crashing]
    assert due([Slot(3, retired=True)], now=5.0, last_spawn=0.0) == []


def test_scoreboard_keeps_heartbeat_and_request_fields_apart() -> None:
    board = Scoreboard(3)
    board.reset(1, 0, now=5.0)
    board.set_pid(1, 4321)
    board.begin(1, 1000.0, "/x" * 100)
    board.heartbeat(1, 7.5)
    state = board.read(1)
    assert (state.pid, state.busy, state.started, state.heartbeat) == (4321, True, 1000.0, 7.5)
    assert state.path == ("/x" * 100)[:120]
    board.end(1, 42, 9.0)
    state = board.read(1)
    assert (state.busy, state.requests, state.heartbeat, state.pid) == (False, 42, 9.0, 4321)
    assert board.read(0).pid == 0 and board.read(2).pid == 0


def test_a_spooled_body_moves_to_a_file_past_its_limit_and_reads_back_whole() -> None:
    small = SpooledBody(limit=100)
    small.append(b"a" * 60)
    assert not small.spooled
    assert InputStream(small.reader()).read() == b"a" * 60
    big = SpooledBody(limit=100)
    for i in range(50):
        big.append(bytes([65 + i % 26]) * 1000)
    assert big.spooled and big.size == 50000
    data = InputStream(big.reader()).read()
    assert len(data) == 50000 and data[:1000] == b"A" * 1000 and data[-1000:] == b"X" * 1000
    big.close()
    small.close()


def test_allow_list_takes_addresses_ranges_and_any() -> None:
    loopback = AllowList(list(LOOPBACK))
    assert loopback.allows("127.0.0.1") and loopback.allows("127.1.2.3")
    assert loopback.allows("::1") and loopback.allows("::ffff:127.0.0.1")
    assert not loopback.allows("10.0.0.1") and not loopback.allows("::2")
    nets = AllowList(["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"])
    assert nets.allows("10.9.9.9") and nets.allows("2001:db8::5") and nets.allows("192.0.2.7")
    assert not nets.allows("127.0.0.1") and not nets.allows("not an ip")
    assert AllowList(["any"]).allows_any and AllowList(["ANY"]).allows("203.0.113.1")
    with pytest.raises(AddressError, match="10.0.0.300"):
        AllowList(["10.0.0.300"])


def test_a_broken_connection_is_freed_without_the_cyclic_collector() -> None:
    gc.disable()
    try:
        conn = Connection()
        conn.receive_data(b"\x07" + b"\x00" * 7 + b"z" * 100000)
        with pytest.raises(ProtocolError):
            conn.next_event()
        with pytest.raises(ProtocolError, match="version"):
            conn.next_event()  # still broken, still saying why
        ref = weakref.ref(conn)
        del conn
        assert ref() is None
    finally:
        gc.enable()
