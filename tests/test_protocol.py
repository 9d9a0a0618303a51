"""edged.protocol over a real AF_UNIX socketpair: framing, reassembly, fds by SCM_RIGHTS, and a
ProtocolError for everything a broken or hostile peer can send."""
from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from edged import protocol
from edged.protocol import MAX_MESSAGE, ProtocolError, Reader
import itertools


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(10)  # a bug must fail the test, not hang it
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


MESSAGES = [
    {"t": "ping", "seq": 1},
    {"t": "f", "id": 42, "stream": "cam1", "off": 4096, "len": 150528, "ct": None, "tags": ["a", "b"]},
    {"t": "r", "body": {"classes": [{"id": 286, "label": "Egyptian cat", "score": 0.7891}]}, "ok": True},
    {"t": "log", "msg": "ünïcødé ✓ \u2028 \"quoted\" \\ back", "level": 20},
    {"t": "r", "data": [0.5] * 50_000},  # bigger than one recv chunk
]


def test_reader_messages_round_trip_in_order(pair):
    a, b = pair
    for msg in MESSAGES:
        protocol.send(a, msg)
    reader = Reader(b)
    assert [reader.read() for _ in MESSAGES] == MESSAGES
    assert reader.buf == bytearray() and reader.fds == []


def test_encode_has_big_endian_length_prefix():
    data = protocol.encode({"t": "ping"})
    (size,) = struct.unpack(">I", data[:4])
    assert size == len(data) - 4 and data[4:] == b'{"t":"ping"}'


def test_send_nan_refused_before_anything_is_written(pair):
    a, b = pair
    with pytest.raises(ValueError):
        protocol.send(a, {"t": "r", "score": float("nan")})
    protocol.send(a, {"t": "ping"})
    assert Reader(b).read() == {"t": "ping"}


# -- file descriptors ----------------------------------------------------------------------------

def test_reader_fd_by_scm_rights_refers_to_same_memfd(pair):
    a, b = pair
    fd = os.memfd_create("edged-test-seg")
    received = -1
    try:
        os.ftruncate(fd, 8192)
        protocol.send(a, {"t": "seg", "id": 3, "size": 8192}, fds=(fd,))
        reader = Reader(b)
        assert reader.read() == {"t": "seg", "id": 3, "size": 8192}
        received = reader.take_fd()
        assert received != fd
        assert (os.fstat(received).st_ino, os.fstat(received).st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
        os.pwrite(fd, b"written by the sender", 100)
        assert os.pread(received, 21, 100) == b"written by the sender"
        with mmap.mmap(received, 8192) as m:  # and the other way round, through a mapping
            m[4096:4101] = b"hello"
        assert os.pread(fd, 5, 4096) == b"hello"
    finally:
        os.close(fd)
        if received >= 0:
            os.close(received)


def test_reader_several_fds_arrive_in_order(pair):
    a, b = pair
    fds = [os.memfd_create(f"seg{i}") for i in range(3)]
    got: list[int] = []
    try:
        for i, fd in enumerate(fds):
            os.pwrite(fd, bytes([i + 1]), 0)
        protocol.send(a, {"t": "seg", "n": 2}, fds=tuple(fds[:2]))
        protocol.send(a, {"t": "seg", "n": 1}, fds=(fds[2],))
        reader = Reader(b)
        assert reader.read()["n"] == 2 and reader.read()["n"] == 1
        got = [reader.take_fd() for _ in range(3)]
        assert [os.pread(g, 1, 0) for g in got] == [b"\x01", b"\x02", b"\x03"]
    finally:
        for fd in fds + got:
            os.close(fd)


def test_reader_take_fd_without_fd_raises_protocolerror(pair):
    a, b = pair
    protocol.send(a, {"t": "seg"})
    reader = Reader(b)
    reader.read()
    with pytest.raises(ProtocolError):
        reader.take_fd()


# -- partial streams -----------------------------------------------------------------------------

def test_reader_tiny_chunks_reassemble_messages(pair):
    a, b = pair
    a.sendall(b"".join(protocol.encode(m) for m in MESSAGES[:4]))
    reader = Reader(b, chunk=3)  # every header and body arrives in pieces
    assert [reader.read() for _ in range(4)] == MESSAGES[:4]


def test_reader_stream_split_across_slow_writes_reassembles(pair):
    a, b = pair
    data = b"".join(protocol.encode(m) for m in MESSAGES)
    cuts = [0, 1, 3, 4, 5, 17, 60, 61, len(data) // 2, len(data) - 1, len(data)]

    def writer() -> None:
        for lo, hi in itertools.pairwise(cuts):
            a.sendall(data[lo:hi])
            time.sleep(0.01)

    t = threading.Thread(target=writer, name="slow-writer")
    t.start()
    reader = Reader(b)
    try:
        assert [reader.read() for _ in MESSAGES] == MESSAGES
    finally:
        t.join(10)


# -- broken peers ----------------------------------------------------------------------------------

def test_reader_oversized_length_prefix_raises_protocolerror(pair):
    a, b = pair
    a.sendall(struct.pack(">I", MAX_MESSAGE + 1) + b"{}")
    with pytest.raises(ProtocolError, match="exceeds"):
        Reader(b).read()


def test_reader_max_length_prefix_raises_without_reading_body(pair):
    a, b = pair
    a.sendall(b"\xff\xff\xff\xff")
    with pytest.raises(ProtocolError):
        Reader(b).read()


@pytest.mark.parametrize("body", [
    b"{not json",
    b"\xff\xfe\x00garbage",          # not even UTF-8
    b"[1, 2, 3]",                    # JSON, but not a message
    b'{"no_type": 1}',
    b'{"t": 5}',
    b"NaN",
    b"",
])
def test_reader_garbage_body_raises_protocolerror(pair, body):
    a, b = pair
    a.sendall(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError):
        Reader(b).read()


def test_reader_closed_peer_raises_protocolerror(pair):
    a, b = pair
    a.close()
    with pytest.raises(ProtocolError, match="closed"):
        Reader(b).read()


@pytest.mark.parametrize("cut", [2, 4, 10])
def test_reader_peer_closed_mid_message_raises_protocolerror(pair, cut):
    a, b = pair
    a.sendall(protocol.encode({"t": "r", "body": "x" * 100})[:cut])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError):
        Reader(b).read()


def test_reader_messages_before_close_still_read(pair):
    a, b = pair
    protocol.send(a, {"t": "fatal", "error": "model cannot load"})
    a.close()
    reader = Reader(b)
    assert reader.read() == {"t": "fatal", "error": "model cannot load"}
    with pytest.raises(ProtocolError):
        reader.read()


def test_read_available_returns_every_whole_message_and_keeps_the_partial_one(pair):
    a, b = pair
    data = b"".join(protocol.encode(m) for m in MESSAGES[:3])
    third = protocol.encode(MESSAGES[3])
    a.sendall(data + third[:7])  # two and a half... three whole ones and the start of a fourth
    r = Reader(b)
    got = []
    while len(got) < 3:
        got += r.read_available()
    assert got == MESSAGES[:3]
    a.sendall(third[7:])
    assert r.read_available() == [MESSAGES[3]]


def test_read_available_hands_over_good_messages_before_a_bad_one(pair):
    a, b = pair
    a.sendall(protocol.encode({"t": "r", "s": 1}) + struct.pack(">I", 3) + b"{x}")
    r = Reader(b)
    assert r.read_available() == [{"t": "r", "s": 1}]
    assert isinstance(r.failed, ProtocolError)
    with pytest.raises(ProtocolError):
        r.read_available()


def test_read_available_raises_at_the_end_of_the_channel(pair):
    a, b = pair
    a.close()
    with pytest.raises(ProtocolError, match="closed"):
        Reader(b).read_available()
