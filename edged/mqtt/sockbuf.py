"""A receive buffer under paho: one recv() of up to 64 KiB serves many of paho's small reads.

paho reads each packet's fixed header a byte per recv() call (the command
byte, then each byte of the remaining length), then the rest: 5 to 8 system
calls per frame and PUBACK on this path. RecvBuffer takes paho's place as its
receive function (`Client._sock_recv`, the one paho calls for every read; it
keeps paho's own translation of TLS want-read/want-write into
BlockingIOError) and answers those reads from what one larger recv() brought.

What it holds belongs to one socket (paho's `_sock`, compared at each call):
a new socket (a reconnect) or a closed one discards it. Bytes held here do
not make the socket readable again, so the drive asks pending() after each
loop_read, as it does of TLS's buffer.
The buffer holds at most one chunk; a read of a chunk or more goes straight
to the socket, so a large frame is not copied twice.

Writes are not buffered: coalescing the packets of a round into one send()
saved a system call per frame but cost more in Python than it saved
(tools/ab_e2e.py on v1 0.25, 2026-12-01: supervisor CPU x1.04 of this
buffer alone, which is x0.98 of none).
"""
from __future__ import annotations

from typing import Any

CHUNK = 64 << 10


class RecvBuffer:
    """paho's `_sock_recv`, buffered; install once per client."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._raw = client._sock_recv  # paho's own: TLS want-read/want-write become BlockingIOError
        self._buf = b""
        self._pos = 0
        self._sock: Any = None
        client._sock_recv = self.recv

    def recv(self, n: int) -> bytes:
        buf = self._buf
        if buf and self._client._sock is self._sock:  # the hot path: served from what is held
            pos = self._pos
            end = pos + n
            if end < len(buf):
                self._pos = end
                return buf[pos:end]
            self._buf, self._pos = b"", 0
            return buf[pos:] if pos else buf
        return self._fill(n)

    def _fill(self, n: int) -> bytes:
        self._sock, self._buf, self._pos = self._client._sock, b"", 0
        if n >= CHUNK:
            return self._raw(n)
        data = self._raw(CHUNK)  # BlockingIOError, OSError: paho's to handle, as before; b"": closed
        if len(data) > n:
            self._buf, self._pos = data, n
            return data[:n]
        return data

    def pending(self) -> int:
        """Bytes received from the current socket that paho has not read yet."""
        if self._client._sock is not self._sock:
            return 0
        return len(self._buf) - self._pos

    def clear(self) -> None:
        self._sock, self._buf, self._pos = None, b"", 0

