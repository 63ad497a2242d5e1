"""The pure parts behind the trust guarantees: heartbeats, body spooling, the allow-list, and a
broken connection that must not keep its buffers alive. (The respawn rules: test_slots.py.)"""

from __future__ import annotations

import gc
import weakref

import pytest

from fcgi_engine.config.address import LOOPBACK, AddressError, AllowList
from fcgi_engine.protocol import Connection, ProtocolError
from fcgi_engine.serving.body import InputStream, SpooledBody
from fcgi_engine.serving.scoreboard import Scoreboard


def test_scoreboard_keeps_heartbeat_and_request_fields_apart() -> None:
    board = Scoreboard(3)
    board.reset(1, 0, now=5.0)
    board.set_pid(1, 4321)
    board.begin(1, 1000.0, "GET", "/x" * 100)
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
