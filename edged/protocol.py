"""The control channel between supervisor and worker.

An AF_UNIX SOCK_STREAM socketpair carries length-prefixed JSON messages (4-byte
big-endian length, then UTF-8 JSON); file descriptors (new pool segments) ride
along as SCM_RIGHTS ancillary data. JSON, never pickle: the supervisor must
not trust what a compromised worker sends.

Messages, by their ``t`` field:
  supervisor -> worker: init, seg (+fd), unseg, f (frame), ping, stop
  worker -> supervisor: ready, fatal, r (result), pong, log
"""
from __future__ import annotations

import array
import json
import select
import socket
import struct
from typing import Any

MAX_MESSAGE = 64 << 20  # results of `raw` models can be large; anything bigger is a broken peer
_HDR = struct.Struct(">I")
_MAX_FDS = 16


class ProtocolError(Exception):
    """The peer closed the channel or sent a malformed message."""


def encode(obj: Any) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    return _HDR.pack(len(body)) + body


def send(sock: socket.socket, obj: Any, fds: tuple[int, ...] = ()) -> None:
    data = encode(obj)
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], anc)
        data = data[sent:]
    if data:
        sock.sendall(data)


class Reader:
    """Reassembles messages (and the fds sent with them) from a stream socket."""

    def __init__(self, sock: socket.socket, chunk: int = 1 << 16) -> None:
        self.sock = sock
        self.chunk = chunk
        self.buf = bytearray()
        self.fds: list[int] = []
        self._error: ProtocolError | None = None

    def _fill(self) -> None:
        data, anc, flags, _addr = self.sock.recvmsg(self.chunk, socket.CMSG_SPACE(_MAX_FDS * 4))
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("file descriptors were dropped in transit (fd limit reached)")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)
        if not data:
            raise ProtocolError("channel closed")
        self.buf += data

    def read(self) -> dict[str, Any]:
        """Block until one whole message is in; return it."""
        while len(self.buf) < 4:
            self._fill()
        size = self._size()
        while len(self.buf) < 4 + size:
            self._fill()
        return self._take(size)

    def read_available(self) -> list[dict[str, Any]]:
        """One receive (the socket is readable: it does not block), then every whole message buffered."""
        if self._error is not None:
            raise self._error
        self._fill()
        out: list[dict[str, Any]] = []
        try:
            while len(self.buf) >= 4:
                size = self._size()
                if len(self.buf) < 4 + size:
                    break
                out.append(self._take(size))
        except ProtocolError as exc:
            if not out:
                raise
            self._error = exc  # the good messages before it first; the next call raises
        return out

    def _size(self) -> int:
        """The body length in the buffered header, within the limit."""
        (size,) = _HDR.unpack_from(self.buf)
        if size > MAX_MESSAGE:
            raise ProtocolError(f"message of {size} bytes exceeds the limit")
        return size

    def _take(self, size: int) -> dict[str, Any]:
        body = bytes(self.buf[4 : 4 + size])
        del self.buf[: 4 + size]
        try:
            msg = json.loads(body)
        except ValueError as exc:
            raise ProtocolError(f"malformed message: {exc}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
            raise ProtocolError("message without a type")
        return msg

    def read_within(self, timeout: float) -> dict[str, Any] | None:
        """The next message if one starts arriving within `timeout` seconds, else None."""
        if not self.buf:
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
            if not poller.poll(max(0, int(timeout * 1000))):
                return None
        return self.read()

    @property
    def failed(self) -> ProtocolError | None:
        """What ended read_available() after the messages it returned, if anything did."""
        return self._error

    def take_fd(self) -> int:
        if not self.fds:
            raise ProtocolError("expected a file descriptor with the message")
        return self.fds.pop(0)
