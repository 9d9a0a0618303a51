"""Buffering under paho's socket: one recv() serves many small reads, one send() carries several packets.

paho reads each packet's fixed header a byte per recv() call (the command
byte, then each byte of the remaining length), then the rest: 5 to 8 system
calls per frame and PUBACK on this path. RecvBuffer takes paho's place as its
receive function (`Client._sock_recv`, the one paho calls for every read; it
keeps paho's own translation of TLS want-read/want-write into
BlockingIOError) and answers those reads from what one larger recv() brought.

What it holds belongs to one socket (paho's `_sock`, compared at each call): a
new socket (a reconnect) or a closed one discards it. Bytes held here do not make the socket readable again, so
the drive asks pending() after each loop_read, as it does of TLS's buffer.
The buffer holds at most one chunk; a read of a chunk or more goes straight
to the socket, so a large frame is not copied twice.

SendCoalescer does the same for writes: paho sends each queued packet with a
send() of its own (a result's PUBLISH, then its frame's PUBACK); it sends the
packet paho hands it together with those queued behind it, and tells paho
the following ones are written when it comes to them. Nothing follows a
DISCONNECT, and what it carries belongs to one socket too.
"""
from __future__ import annotations

import collections
import itertools
from typing import Any

CHUNK = 64 << 10
SEND_MAX = 256 << 10  # bytes one coalesced send() may carry
SEND_PACKETS = 32  # packets one coalesced send() may carry
_DISCONNECT = 0xE0


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


class SendCoalescer:
    """paho's `_sock_send`, carrying the packets queued behind the one paho hands it; install once per client."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._raw = client._sock_send  # paho's own: would-block becomes BlockingIOError, and asks for a write
        self._credit: collections.deque[int] = collections.deque()  # bytes of the next packets already sent
        self._sock: Any = None
        client._sock_send = self.send

    def send(self, buf: bytes | bytearray) -> int:
        sock = self._client._sock
        if sock is not self._sock:
            self._sock = sock
            self._credit.clear()
        if self._credit:  # paho's next packet, in order: already on its way
            return min(self._credit.popleft(), len(buf))
        if buf[:1] and buf[0] & 0xF0 == _DISCONNECT:
            return self._raw(buf)
        # a copy in one step (no thread can run between), of packets paho has not begun to write
        queued = list(itertools.islice(self._client._out_packet, SEND_PACKETS))
        parts, lengths, total = [buf], [], len(buf)
        for pkt in queued:
            data = pkt["packet"]
            if pkt["pos"] or total + len(data) > SEND_MAX:
                break
            parts.append(data)
            lengths.append(len(data))
            total += len(data)
            if pkt["command"] & 0xF0 == _DISCONNECT:
                break
        if not lengths:
            return self._raw(buf)
        sent = self._raw(b"".join(parts))
        first = len(buf)
        rest = sent - first
        for n in lengths:
            if rest <= 0:
                break
            self._credit.append(min(n, rest))
            rest -= n
        return min(sent, first)
