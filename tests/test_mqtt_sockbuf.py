"""edged.mqtt.sockbuf under a client of our own over a real socketpair: what paho reads and writes is unchanged.

The client here is a stand-in we own for the three things sockbuf uses of
paho's (_sock, _sock_recv/_sock_send, _out_packet); the daemon's own
paho, through a real Mosquitto, is what tests/test_delivery.py drives.
"""
from __future__ import annotations

import collections
import socket

import pytest

from edged.mqtt.sockbuf import CHUNK, RecvBuffer, SendCoalescer


class Client:
    def __init__(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock
        self.recvs = 0
        self.sends: list[int] = []
        self._out_packet: collections.deque[dict] = collections.deque()

    def socket(self) -> socket.socket | None:
        return self._sock

    def _sock_recv(self, n: int) -> bytes:
        self.recvs += 1
        assert self._sock is not None
        return self._sock.recv(n)

    def _sock_send(self, buf: bytes) -> int:
        assert self._sock is not None
        n = self._sock.send(buf)
        self.sends.append(n)
        return n

    def write_all(self) -> None:
        """paho's _packet_write, as it pops, sends and puts back what it could not finish."""
        while self._out_packet:
            pkt = self._out_packet.popleft()
            try:
                n = self._sock_send(pkt["packet"][pkt["pos"]:])
            except BlockingIOError:
                self._out_packet.appendleft(pkt)
                return
            pkt["pos"] += n
            if pkt["pos"] < len(pkt["packet"]):
                self._out_packet.appendleft(pkt)


def packet(i: int, size: int, command: int = 0x30) -> dict:
    body = bytes([i % 256]) * size
    return {"command": command, "packet": bytes([command]) + body, "pos": 0}


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


def test_queued_packets_go_out_in_one_send_and_in_order():
    a, b = socket.socketpair()
    c = Client(b)
    SendCoalescer(c)
    pkts = [packet(i, 20) for i in range(5)]
    c._out_packet.extend(pkts)
    c.write_all()
    assert c.sends == [sum(len(p["packet"]) for p in pkts)]  # one system call
    a.setblocking(False)
    assert a.recv(1 << 16) == b"".join(p["packet"] for p in pkts)


def test_partial_sends_on_a_full_socket_lose_and_repeat_nothing():
    a, b = socket.socketpair()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setblocking(False)
    a.setblocking(False)
    c = Client(b)
    SendCoalescer(c)
    pkts = [packet(i, 3000 + 17 * i) for i in range(40)]
    c._out_packet.extend(pkts)
    want = b"".join(p["packet"] for p in pkts)
    got = bytearray()
    for _ in range(10_000):
        c.write_all()
        try:
            got += a.recv(1 << 16)
        except BlockingIOError:
            pass
        if not c._out_packet and len(got) >= len(want):
            break
    assert bytes(got) == want
    assert len(c.sends) < len(pkts) * 2  # partial writes happened, and still fewer calls than packets


def test_nothing_is_sent_after_a_disconnect():
    a, b = socket.socketpair()
    c = Client(b)
    SendCoalescer(c)
    c._out_packet.extend([packet(1, 10), packet(2, 1, command=0xE0), packet(3, 10)])
    pkt = c._out_packet.popleft()
    assert c._sock_send(pkt["packet"]) == len(pkt["packet"])
    a.setblocking(False)
    assert a.recv(1 << 16) == packet(1, 10)["packet"] + packet(2, 1, command=0xE0)["packet"]
