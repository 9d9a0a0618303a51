"""edged.mqtt.sockbuf under a client of our own over a real socketpair: what paho reads is unchanged.

The client here is a stand-in we own for what sockbuf uses of paho's (_sock, _sock_recv);
the daemon's own paho, through a real Mosquitto, is what tests/test_delivery.py drives.
"""
from __future__ import annotations

import socket

import pytest

from edged.mqtt.sockbuf import CHUNK, RecvBuffer


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock
        self.recvs = 0

    def socket(self) -> socket.socket | None:
        return self._sock

    def _sock_recv(self, n: int) -> bytes:
        self.recvs += 1
        assert self._sock is not None
        return self._sock.recv(n)


def test_small_reads_come_from_one_recv_and_keep_every_byte_in_order():
    a, b = socket.socketpair()
    c = Client(b)
    buf = RecvBuffer(c)
    data = bytes(range(256)) * 40
    a.sendall(data)
    got = b"".join(c._sock_recv(k) for k in [1, 1, 1, 3, 500, 1] * 8)
    assert data.startswith(got) and len(got) == 8 * 507
    assert c.recvs == 1 and buf.pending() == len(data) - len(got)
    rest = c._sock_recv(len(data))
    assert got + rest == data and buf.pending() == 0


def test_a_large_read_goes_to_the_socket_and_a_new_socket_drops_what_the_old_one_left():
    a, b = socket.socketpair()
    c = Client(b)
    buf = RecvBuffer(c)
    a.sendall(b"x" * 10)
    assert c._sock_recv(1) == b"x" and buf.pending() == 9
    a2, b2 = socket.socketpair()
    c._sock = b2  # a reconnect: the old connection's bytes are not this one's
    assert buf.pending() == 0
    a2.sendall(b"y" * (CHUNK + 5))
    got = b""
    while len(got) < CHUNK + 5:
        got += c._sock_recv(CHUNK + 5 - len(got))
    assert got == b"y" * (CHUNK + 5)
    b2.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing buffered, nothing on the socket: paho's "again"
        c._sock_recv(1)

