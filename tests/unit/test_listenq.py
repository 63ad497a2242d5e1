"""The accept-queue probe (system/listenq.py) against real listeners: N clients connected and
not accepted are N waiting, for TCP and unix sockets alike; the backlog is the limit."""

from __future__ import annotations

import socket
from pathlib import Path

from fcgi_engine.system.listenq import ListenQueue


def _queue_with_waiting(listener: socket.socket, connect: object, n: int) -> list[int | None]:
    probe = ListenQueue(listener)
    seen = []
    clients = []
    try:
        seen.append(probe.sample()[0])
        for _ in range(n):
            clients.append(connect())  # type: ignore[operator]
        seen.append(probe.sample()[0])
        conn, _ = listener.accept()
        conn.close()
        seen.append(probe.sample()[0])
        assert probe.sample()[1] == 7
    finally:
        for client in clients:
            client.close()
        probe.close()
    return seen


def test_a_tcp_listener_counts_connections_not_yet_accepted() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(7)
        address = listener.getsockname()
        seen = _queue_with_waiting(listener, lambda: socket.create_connection(address), 3)
    assert seen == [0, 3, 2]


def test_a_unix_listener_counts_connections_not_yet_accepted(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")

    def connect() -> socket.socket:
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        return client

    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(7)
        seen = _queue_with_waiting(listener, connect, 4)
    assert seen == [0, 4, 3]


def test_what_cannot_be_measured_is_none() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        probe = ListenQueue(udp)
        assert probe.sample() == (None, None)
        # Once broken, it does not try again (no failing syscall on every turn of the loop).
        assert probe._broken and probe.sample() == (None, None)
