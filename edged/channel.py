"""The control channel's framing: length-prefixed JSON messages over a stream socket, fds by SCM_RIGHTS.

4-byte big-endian length, then UTF-8 JSON (never pickle: a worker runs
untrusted code); NaN and Infinity are refused both ways. The typed messages
that travel here are edged.protocol's.
"""
from __future__ import annotations

import array
import json
import os
import select
import socket
import struct
from typing import Any

from edged.errors import ProtocolError

MAX_MESSAGE = 64 << 20  # the framing's own ceiling; each Reader may set a lower one
_HDR = struct.Struct(">I")
_MAX_FDS = 16
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # built once, not per message


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def encode(obj: dict[str, Any]) -> bytes:
    body = _JSON.encode(obj).encode()
    return _HDR.pack(len(body)) + body


def send(sock: socket.socket, obj: dict[str, Any], fds: tuple[int, ...] = ()) -> None:
    data = encode(obj)
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([data], anc)
        data = data[sent:]
    if data:
        sock.sendall(data)



class Reader:
    """Reassembles messages (and the fds sent with them) from a stream socket.

    `max_message` caps what one message may make us buffer; with `accept_fds`
    off (the supervisor reading a worker) any descriptor that arrives is
    closed at once and the channel is broken.
    """

    def __init__(self, sock: socket.socket, chunk: int = 1 << 16, *, max_message: int = MAX_MESSAGE,
                 accept_fds: bool = True) -> None:
        self.sock = sock
        self.chunk = chunk
        self.max_message = max_message
        self.accept_fds = accept_fds
        self.buf = bytearray()
        self.fds: list[int] = []
        self._error: ProtocolError | None = None

    def _fill(self) -> None:
        room = socket.CMSG_SPACE(_MAX_FDS * 4) if self.accept_fds else socket.CMSG_SPACE(4)
        data, anc, flags, _addr = self.sock.recvmsg(self.chunk, room)
        got: list[int] = []
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                got.extend(fds)
        if got and not self.accept_fds:
            for fd in got:
                os.close(fd)
            raise ProtocolError(f"peer sent {len(got)} file descriptor(s), which this channel refuses")
        self.fds.extend(got)
        if flags & socket.MSG_CTRUNC:
            raise ProtocolError("file descriptors were dropped in transit (fd limit reached)")
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
        if size > self.max_message:
            raise ProtocolError(f"message of {size} bytes exceeds the limit of {self.max_message}")
        return size

    def _take(self, size: int) -> dict[str, Any]:
        body = bytes(self.buf[4 : 4 + size])
        del self.buf[: 4 + size]
        try:
            msg = json.loads(body, parse_constant=_no_constants)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"malformed message: {str(exc)[:200]}") from None
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
