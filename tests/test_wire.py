"""The typed worker protocol: one encoder, one validating decoder; what a hostile worker sends is refused."""
from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from edged import protocol
from edged.errors import EdgedError, ProtocolError, WorkerError


def test_every_message_round_trips_through_the_wire_form() -> None:
    msgs: list[protocol.Message] = [
        protocol.FrameJob(1, 0, 64, 100, "image/png"), protocol.SegmentAdd(2, 4096), protocol.SegmentDrop(2),
        protocol.Ping(3), protocol.Stop(), protocol.Pong(3), protocol.Log(20, "hello"),
        protocol.Result(5, {"classes": [{"id": 1, "label": "x", "score": 0.5}]}, 1.5, 2.5, 2),
        protocol.Result(6, error_code="bad_payload", error_message="no"), protocol.Fatal("model", "bad"),
        protocol.Ready({"path": "m.tflite"}, {"chosen": "cpu"}, "classify", 1, True, "default")]
    for m in msgs:
        allowed = protocol.TO_WORKER + protocol.FROM_WORKER
        assert protocol.decode(protocol.as_dict(m), allowed) == m


@pytest.mark.parametrize("raw", [
    {"t": "r", "seq": 1, "body": {"classes": [], "frame_id": "forged"}},  # a field the supervisor owns
    {"t": "r", "seq": 1, "body": {"timing_ms": {}}},
    {"t": "r", "seq": 1, "body": {"classes": "not a list"}},
    {"t": "r", "seq": "1"},  # wrong type
    {"t": "r", "seq": True},  # a bool is not a sequence number
    {"t": "r", "seq": 1, "extra": 1},  # unknown field
    {"t": "r"},  # missing seq
    {"t": "r", "seq": 1, "inference_ms": -1.0},
    {"t": "r", "seq": 1, "error_code": "Not A Code"},
    {"t": "r", "seq": 1, "error_message": "x" * 1001},
    {"t": "log", "level": 99, "msg": "x"},
    {"t": "f", "seq": 1, "segment": 0, "offset": 0, "length": 1},  # a supervisor message, from a worker
    {"t": "ready", "model": {}, "accelerator": {}, "task": "classify", "batch": 0, "sandboxed": True,
     "sandbox_profile": "x"},
    {"t": "nope"},
])
def test_decode_refuses_what_a_hostile_worker_might_send(raw: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode(raw, protocol.FROM_WORKER)


def test_protocol_error_is_a_worker_error_in_the_tree() -> None:
    assert issubclass(ProtocolError, WorkerError) and issubclass(ProtocolError, EdgedError)


def test_reader_refusing_fds_closes_them_and_breaks_the_channel() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        before = len(os.listdir("/proc/self/fd"))
        protocol.send(a, protocol.Pong(), fds=(r, r, r))
        reader = protocol.Reader(b, accept_fds=False)
        with pytest.raises(ProtocolError, match="file descriptor"):
            reader.read()
        assert len(os.listdir("/proc/self/fd")) == before  # the three copies were closed at once
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)


def test_reader_cap_refuses_a_message_over_it_before_buffering_it() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        a.sendall(protocol.encode({"t": "log", "level": 20, "msg": "x" * 5000})[:4096])
        reader = protocol.Reader(b, max_message=1024)
        with pytest.raises(ProtocolError, match="exceeds the limit of 1024"):
            reader.read()
    finally:
        a.close()
        b.close()


def test_reader_refuses_nan_and_infinity() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        body = b'{"t":"r","seq":1,"inference_ms":NaN}'
        a.sendall(len(body).to_bytes(4, "big") + body)
        with pytest.raises(ProtocolError):
            protocol.Reader(b).read()
    finally:
        a.close()
        b.close()
