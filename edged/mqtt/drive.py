"""paho driven by the supervisor's I/O loop: connect, read, write, keepalive, reconnect back-off.

paho is driven with loop_read/loop_write/loop_misc from edged.ioloop, not
by a thread of its own. The one blocking step, the TCP (and TLS) connect,
runs on a short-lived helper thread while the loop keeps serving the
workers; reconnects back off from 1 s to mqtt.reconnect_max_s, as paho's
own loop would. Reads go through edged.mqtt.sockbuf (one recv() for many
packets, where paho alone asks the kernel for each header byte).
"""
from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

import paho.mqtt.client as paho

from edged.config import Config
from edged.ioloop import IoLoop
from edged.mqtt.sockbuf import RecvBuffer

logger = logging.getLogger(__name__)

READS_PER_WAKE = 64  # loop_read() calls per readable event while bytes wait in a buffer


class LoopDrive:
    """The connection's life on the I/O loop; edged.mqtt.link.MqttLink adds what travels over it."""

    def __init__(self, cfg: Config, loop: IoLoop, client: paho.Client, max_packet: int) -> None:
        self.cfg = cfg
        self.loop = loop
        self.client = client
        self.max_packet = max_packet
        self.oversized = 0
        self._sock: Any = None  # the socket the loop watches, while connected or connecting
        self._writing = False
        self._connecting = False
        self._closing = False
        self._delay = 1.0
        self._stopped = threading.Event()
        self._last_failure: str | None = None  # the last connect failure said at WARNING
        self._recv = RecvBuffer(client)
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = None
        loop.after_events(self._flush)

    # ---- on the I/O loop ---------------------------------------------------------
    def _connect_later(self, delay: float) -> None:
        if self._closing or self._connecting:
            return
        self._connecting = True
        self.loop.call_later(delay, lambda: threading.Thread(target=self._connect, name="mqtt-connect",
                                                             daemon=True).start())

    def _connect(self) -> None:
        """Helper thread: paho's reconnect() (blocking connect, then CONNECT queued); the loop takes over."""
        try:
            ok = self.client.reconnect() == paho.MQTT_ERR_SUCCESS
        except (OSError, ssl.SSLError, ValueError) as exc:
            # said at WARNING the first time and whenever the reason changes; the retries in between quietly
            why = f"{type(exc).__name__}: {exc}"
            level = logging.WARNING if why != self._last_failure else logging.DEBUG
            self._last_failure = why
            logger.log(level, "connecting to %s:%s failed: %s; retrying", self.cfg.mqtt.host, self.cfg.mqtt.port, why)
            ok = False
        self.loop.call_soon(self._connect_done, ok)

    def _connect_done(self, ok: bool) -> None:
        self._connecting = False
        if self._closing:
            return
        sock = self.client.socket()
        if not ok or sock is None:
            self._lost()
            return
        self._sock = sock
        self._writing = False
        self.loop.watch(sock, self._read)
        self._flush()

    def _lost(self) -> None:
        """The connection is gone (or never came): forget the socket, try again after the back-off."""
        if self._sock is not None:
            self.loop.watch(self._sock, None)
            self._sock = None
        self._recv.clear()
        if self._closing:
            self._stopped.set()
            return
        delay, self._delay = self._delay, min(self._delay * 2, max(1.0, float(self.cfg.mqtt.reconnect_max_s)))
        self._connect_later(delay)

    def _check(self, rc: int) -> None:
        if rc != paho.MQTT_ERR_SUCCESS and self.client.socket() is None:
            self._lost()

    def _read(self) -> None:
        if self._sock is None or self._connecting:
            return
        # bytes already taken off the socket (our receive buffer; TLS: decrypted into the SSL object's) do
        # not make it readable again: read on while they last, as paho's own loop checks pending() for TLS.
        # Bounded per wake-up, so a broker that never pauses cannot starve the workers' events.
        for _ in range(READS_PER_WAKE):
            rc = self.client.loop_read()
            self._check(rc)
            self._refuse_oversized()
            if rc != paho.MQTT_ERR_SUCCESS or self._sock is None:
                return
            if not self._recv.pending():
                pending = getattr(self.client.socket(), "pending", None)
                if pending is None or pending() <= 0:
                    return
        self.loop.call_later(0.0, self._read)  # more buffered: after the next poll of the other events

    def _refuse_oversized(self) -> None:
        """A packet over our Maximum Packet Size (a broker that ignores it): drop the connection, as MQTT 5 says.

        paho reads a packet whole before it hands it over; its partial buffer is
        its private state, read here only to stop it growing past the limit.
        """
        pkt = getattr(self.client, "_in_packet", None)
        if not isinstance(pkt, dict) or not pkt.get("have_remaining"):
            return
        if int(pkt.get("remaining_length", 0)) <= self.max_packet:
            return
        self.oversized += 1
        logger.error("broker sent a packet of %s bytes, over our Maximum Packet Size %d: disconnecting (0x95)",
                     pkt.get("remaining_length"), self.max_packet)
        sock = self.client.socket()
        if sock is not None:
            try:
                sock.close()  # paho notices on its next read and frees its buffer; we reconnect
            except OSError:
                pass
        self._lost()

    def _flush(self) -> None:
        """After each round of events: write what callbacks and other threads queued."""
        if self._sock is None or self._connecting:
            return
        if self.client.want_write():
            self._check(self.client.loop_write())
        if self._sock is None:
            return
        pending = self.client.want_write()  # the socket buffer is full: write again when it drains
        if pending != self._writing:
            self._writing = pending
            self.loop.watch(self._sock, self._read, self._flush if pending else None)

    def _tick(self) -> None:
        """Once a second: keepalive pings and the broker's silence (paho's loop_misc)."""
        if self._sock is not None and not self._connecting:
            self._check(self.client.loop_misc())
        if not self._stopped.is_set():
            self.loop.call_later(1.0, self._tick)

    def _on_socket_close(self, client: paho.Client, userdata: object, sock: Any) -> None:
        if self.loop.in_loop() and sock is self._sock:
            self.loop.watch(sock, None)
            self._sock = None
            self._writing = False

    def _on_register_write(self, client: paho.Client, userdata: object, sock: Any) -> None:
        if not self.loop.in_loop():
            self.loop.wake()  # the loop writes it; on the loop itself, _flush does after this round
