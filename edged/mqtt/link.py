"""The daemon's MQTT link: subscriptions, frames in (through edged.door), results and acknowledgements out.

MQTT v5, a persistent session (fixed client id, clean_start off, a session
expiry), manual acknowledgement: a QoS 1 frame is acknowledged to the broker
only once its result has been handed to paho, so a frame the daemon never
answered is redelivered after a restart. Results go out at QoS 1; at most
mqtt.result_buffer of them wait for the broker's PUBACK in paho's queue (past
that, publish() says "busy" while connected, "away" while not). Every frame
message passes edged.door before admission sees it; the CONNECT asks for a
Maximum Packet Size of twice queue.max_frame_bytes (plus headroom), so the
broker drops grossly oversized frames for us; one under that is answered
too_large. Callbacks only translate and hand over, and never raise into
paho (an exception there would leave paho re-reading the same packet).
The connection's life on the I/O loop is edged.mqtt.drive's.

This link is the daemon's own connection (P/in/+, P/status, results). A
fleet's shared subscription has a connection of its own with a session that
ends with it (edged.fleet.ShareLink, built on the hooks marked "session" here).
"""
from __future__ import annotations

import collections
import logging
import socket
import threading
import time
import zlib
from collections.abc import Callable

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edged.config import Config
from edged.door import Door, Incoming, filter_matches
from edged.errors import MqttError
from edged.ioloop import IoLoop
from edged.mqtt.client import EVENTS_HELD, MAX_PACKET, OVERSIZE_FACTOR, PACKET_HEADROOM, frame_subscription, \
    new_client, share_filter
from edged.mqtt.drive import LoopDrive

logger = logging.getLogger(__name__)


class MqttLink(LoopDrive):
    """paho driven by the supervisor's I/O loop (loop_read/loop_write/loop_misc), not by a thread of its own.

    Callbacks (frames, acknowledgements, connection changes) run on the loop
    thread; publish() and ack() may be called from any thread.
    """

    # session: the daemon's own connection keeps its session (clean_start off, mqtt.session_expiry),
    # announces P/status (retained, with the last will); edged.fleet.ShareLink says False to both
    persistent = True

    def __init__(self, cfg: Config, on_frame: Callable[[Incoming], None],
                 on_connection: Callable[[bool], None] | None = None, *, loop: IoLoop,
                 door: Door | None = None, on_room: Callable[[], None] | None = None,
                 client_id: str | None = None) -> None:
        self.prefix = cfg.prefix
        self.on_frame = on_frame
        self.on_connection = on_connection
        self.on_room = on_room  # called on the loop when results can be taken again
        self.door = door or Door(cfg)
        # twice the frame limit: a frame somewhat over it still reaches us and is answered too_large (the
        # publisher learns why); a grossly oversized one is dropped by the broker before it costs us memory
        biggest = OVERSIZE_FACTOR * cfg.queue.max_frame_bytes
        if cfg.model.update.enabled:  # a model bundle is one message too
            biggest = max(biggest, int(cfg.model.update.max_mb * (1 << 20)))
        max_packet = min(MAX_PACKET, biggest + PACKET_HEADROOM)
        self.unrouted = 0
        # other subscriptions (add_route): (filter, qos, handler); their messages never reach on_frame
        self._routes: list[tuple[str, int, Callable[[str, bytes, bool], None]]] = []
        share = cfg.mqtt.share
        self._frame_prefixes = (f"{self.prefix}/in/",) + ((f"{share.prefix.rstrip('/')}/in/",) if share else ())
        self.connected = False
        self.reconnects = 0
        self.connects = 0
        self.overflows = 0
        self.status_payload = b'{"state": "starting"}'
        self.events_held: collections.deque[bytes] = collections.deque(maxlen=EVENTS_HELD)
        self._lock = threading.RLock()
        super().__init__(cfg, loop, new_client(cfg, client_id or cfg.client_id, manual_ack=True), max_packet)
        # paho's own queue limit also counts results waiting for their PUBACK: a limit there drops
        # results while connected. The bound is ours instead: results held while the broker is away.
        self.client.max_queued_messages_set(0)
        self._unacked: set[int] = set()
        self._acked_early: dict[int, float] = {}  # mid -> when: acknowledged before publish() recorded it
        # session: QoS 1 frames in hand (delivered, not yet acknowledged) and answered, each as mid -> (the
        # connection it came on, a fingerprint: topic, size, ends of the payload, user properties). A PUBACK
        # queued as the connection died is lost, and the kept session gets that frame again (DUP) after the
        # reconnect: one answered that came on an earlier connection is acknowledged again, not run twice;
        # one still in hand is dropped (its own acknowledgement covers it); the fingerprint keeps a broker
        # that reuses a packet id at once from making a new frame look answered. The broker has at most
        # receive_maximum() frames unacknowledged to us, so the last 4 x that many answers are enough.
        self._in_hand: dict[int, tuple[int, tuple[object, ...]]] = {}
        self._answered: collections.OrderedDict[int, tuple[int, tuple[object, ...]]] = collections.OrderedDict()
        self._answered_kept = min(65535, max(1024, 4 * self.receive_maximum()))
        self.redelivered_acked = 0
        self.redelivered_dropped = 0
        self.client.max_inflight_messages_set(100)
        if self.persistent:
            self.client.will_set(f"{self.prefix}/status", b'{"state": "offline"}', qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe
        self._unsubscribed: dict[int, Callable[[], None]] = {}  # mid -> called on its UNSUBACK (loop thread)
        self.client.on_publish = self._on_publish

    def receive_maximum(self) -> int:
        """session: QoS 1 frames the broker may have in flight to us (backpressure: it holds back what our
        queue could not take)."""
        return min(65535, self.cfg.queue.max_per_stream)

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.mqtt.session_expiry if self.persistent else 0
        props.ReceiveMaximum = max(1, min(65535, self.receive_maximum()))
        # the broker must not send us a packet bigger than this: it refuses oversized frames for us
        props.MaximumPacketSize = self.max_packet
        self.client.connect_async(self.cfg.mqtt.host, self.cfg.mqtt.port, keepalive=self.cfg.mqtt.keepalive,
                                  clean_start=not self.persistent, properties=props)
        self.loop.call_soon(self._connect_later, 0.0)
        self.loop.call_soon(self._tick)

    def subscriptions(self) -> list[tuple[str, SubscribeOptions]]:
        # the fleet's $share filter is not here: it has a connection of its own (edged.fleet)
        subs = [frame_subscription(f"{self.prefix}/in/+")]
        subs.extend((f, SubscribeOptions(qos=q)) for f, q, _h in self._routes)
        return subs

    def add_route(self, filters: list[tuple[str, int]], handler: Callable[[str, bytes, bool], None]) -> None:
        """Subscribe to `filters` too (from the next connect on); their messages go to handler(topic, payload,
        retained) on the loop thread, never to admission. Call before start()."""
        self._routes.extend((f, q, handler) for f, q in filters)

    def _on_other(self, topic: str, msg: paho.MQTTMessage) -> None:
        """A message that is not a frame: to the route whose filter matches, else dropped; never admitted."""
        self.ack(msg.mid, msg.qos)
        for filt, _q, handler in self._routes:
            if filter_matches(filt, topic):
                handler(topic, bytes(msg.payload), bool(msg.retain))
                return
        self.unrouted += 1

    def _on_connect(self, client: paho.Client, userdata: object, flags: object, rc: paho.ReasonCode,
                    props: object) -> None:
        if rc.is_failure:
            logger.warning("broker %s:%s refused the connection: %s", self.cfg.mqtt.host, self.cfg.mqtt.port, rc)
            return
        try:
            sock = client.socket()
            if sock is not None and hasattr(sock, "setsockopt"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self._delay = 1.0  # the next loss starts its back-off afresh
        self._last_failure = None
        self.connects += 1
        if self.connects > 1:
            self.reconnects += 1
        self.connected = True
        logger.info("connected to broker %s:%s (session present: %s)", self.cfg.mqtt.host, self.cfg.mqtt.port,
                    getattr(flags, "session_present", "?"))
        if not getattr(flags, "session_present", False):
            with self._lock:  # a new session: its packet ids mean nothing of the old one's
                self._in_hand.clear()
                self._answered.clear()
        sub_rc, _mid = client.subscribe(self.subscriptions())
        if sub_rc != paho.MQTT_ERR_SUCCESS:
            logger.error("subscribing failed: %s", paho.error_string(sub_rc))
        if self.persistent:
            legacy = share_filter(self.cfg)
            if legacy is not None and getattr(flags, "session_present", False):
                # a session kept from before edged.fleet may still hold the group: leave it on this
                # connection, or the broker keeps a dead daemon's share in this persistent session
                self.unsubscribe([legacy], lambda: logger.info("left %s on the own session (kept from before "
                                                               "the fleet had a connection of its own)", legacy))
            client.publish(f"{self.prefix}/status", self.status_payload, qos=1, retain=True)
            self._flush_events()
        self._connected_hook()
        if self.on_connection:
            self.on_connection(True)

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int, codes: list[paho.ReasonCode],
                      props: object) -> None:
        bad = [str(c) for c in codes if c.is_failure]
        if bad:
            logger.error("broker refused a subscription: %s", ", ".join(bad))

    def _connected_hook(self) -> None:
        """session: on the loop, once the broker accepted this connection and the subscriptions went out."""

    def unsubscribe(self, filters: list[str], done: Callable[[], None] | None = None) -> bool:
        """On the loop: UNSUBSCRIBE filters; `done` runs on the loop when the broker's UNSUBACK comes.
        False when the request could not be sent (not connected)."""
        rc, mid = self.client.unsubscribe(filters)
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            return False
        if done is not None:
            self._unsubscribed[mid] = done
        return True

    def _on_unsubscribe(self, client: paho.Client, userdata: object, mid: int, codes: list[paho.ReasonCode],
                        props: object) -> None:
        done = self._unsubscribed.pop(mid, None)
        if done is not None:
            done()

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: object, rc: paho.ReasonCode,
                       props: object) -> None:
        if self.connected and not self._closing:
            logger.warning("disconnected from broker: %s; reconnecting", rc)
        self.connected = False
        self._unsubscribed.clear()
        self._disconnected_hook()
        if self.on_connection:
            self.on_connection(False)

    def _disconnected_hook(self) -> None:
        """session: on the loop, when this connection is gone."""

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        """Never raises into paho: a failure here is logged with its traceback, and the message acknowledged."""
        try:
            try:
                topic: str | None = msg.topic
            except UnicodeDecodeError:
                topic = None  # the door refuses it as a stream name
            if self._routes and topic is not None and not topic.startswith(self._frame_prefixes):
                self._on_other(topic, msg)
                return
            fp = _fingerprint(topic, msg) if msg.qos and self.persistent else ()
            if msg.qos and msg.dup and self.persistent and self._seen(msg.mid, fp):
                return
            inc = self.door.inspect(topic, bytes(msg.payload), msg.qos, msg.mid, bool(msg.retain),
                                    getattr(msg, "properties", None))
            if inc is None:
                self.unrouted += 1
                self.ack(msg.mid, msg.qos)
                return
            if msg.qos and self.persistent:
                with self._lock:
                    self._in_hand[msg.mid] = (self.connects, fp)
            self._deliver(inc)
        except Exception:  # top of paho's callback: one message must not wedge the reader
            logger.exception("handling the message on %r (mid %s) failed", msg._topic[:200], msg.mid)
            self.ack(msg.mid, msg.qos)

    def _seen(self, mid: int, fp: tuple[object, ...]) -> bool:
        """A frame sent again (DUP) that this session has in hand or answered already: dropped, or acknowledged
        again when its answer's PUBACK was lost with the last connection."""
        with self._lock:
            held = self._in_hand.get(mid)
            if held is not None and held[1] == fp:
                self.redelivered_dropped += 1
                return True
            done = self._answered.get(mid)
            if done is None or done[1] != fp or done[0] >= self.connects:
                return False
            self.redelivered_acked += 1
        self.ack(mid, 1)
        return True

    def release(self, mid: int) -> None:
        """A QoS 1 frame left unacknowledged on purpose, for the broker to deliver again: that delivery is run."""
        with self._lock:
            self._in_hand.pop(mid, None)

    def _deliver(self, inc: Incoming) -> None:
        """session: hand a checked frame on (edged.fleet binds its acknowledgement to this connection)."""
        self.on_frame(inc)

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, rc: paho.ReasonCode,
                    props: object) -> None:
        with self._lock:
            if mid in self._unacked:
                self._unacked.discard(mid)
            else:  # a status message, or a result acknowledged before publish() could record it
                self._acked_early[mid] = time.monotonic()
        if self.on_room is not None:
            self.on_room()

    def held(self) -> int:
        """Results handed to paho and not yet acknowledged by the broker."""
        with self._lock:
            return len(self._unacked)

    def has_room(self) -> bool:
        return self.held() < self.cfg.mqtt.result_buffer

    def publish(self, topic: str, payload: bytes, *, correlation: bytes | None = None) -> str:
        """Queue a result at the configured QoS: "sent" (paho has it), "busy" (mqtt.result_buffer results wait
        for their PUBACK: try again on_room) or "away" (the broker is away and that buffer is full).
        A topic or payload the client refuses is an MqttError."""
        if not self.has_room():
            if self.connected:
                return "busy"
            with self._lock:
                self.overflows += 1
            return "away"
        # properties cost a Python-level pack per message: only what request/response needs
        props = None
        if correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
        # never hold our lock across paho's publish: paho calls on_publish under its own lock
        try:
            info = self.client.publish(topic, payload, qos=self.cfg.mqtt.qos, properties=props)
        except (ValueError, TypeError) as exc:
            raise MqttError(f"cannot publish to {topic[:100]!r}: {exc}") from None
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            return "busy"
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):  # NO_CONN: queued for the reconnect
            raise MqttError(f"cannot publish to {topic[:100]!r}: {paho.error_string(info.rc)}")
        if self.cfg.mqtt.qos > 0:
            with self._lock:
                if self._acked_early.pop(info.mid, None) is None:
                    self._unacked.add(info.mid)
                if len(self._acked_early) > 64:  # only the race window matters: forget the old ones
                    cutoff = time.monotonic() - 5.0
                    self._acked_early = {m: t for m, t in self._acked_early.items() if t > cutoff}
        return "sent"

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a frame; one that cannot be acknowledged now is delivered again after the reconnect."""
        if qos > 0:
            if self.persistent:
                with self._lock:
                    held = self._in_hand.pop(mid, None)
                    if held is not None:
                        self._answered[mid] = held
                        self._answered.move_to_end(mid)
                        if len(self._answered) > self._answered_kept:
                            self._answered.popitem(last=False)
            try:
                rc = self.client.ack(mid, qos)
            except (ValueError, OSError) as exc:
                logger.debug("acknowledging mid %d failed: %s", mid, exc)
                return
            if rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN, None):
                logger.debug("acknowledging mid %d failed: %s", mid, paho.error_string(rc))

    def set_status(self, payload: bytes) -> None:
        """Publish the retained P/status now (if connected) and on every reconnect."""
        self.status_payload = payload
        if self.connected:
            self.client.publish(f"{self.prefix}/status", payload, qos=1, retain=True)

    def publish_message(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """A message that is not a result (discovery, entity states): now if connected, else False (not held)."""
        if not self.connected:
            return False
        try:
            self.client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:
            raise MqttError(f"cannot publish to {topic[:100]!r}: {exc}") from None
        return True

    def publish_event(self, payload: bytes) -> None:
        """P/events: QoS 1, not retained; held (at most EVENTS_HELD, oldest dropped) while the broker is away."""
        self.events_held.append(payload)
        if self.connected:
            self._flush_events()

    def _flush_events(self) -> None:
        with self._lock:
            while self.events_held and self.connected:
                self.client.publish(f"{self.prefix}/events", self.events_held.popleft(), qos=1, retain=False)

    def publish_stats(self, payload: bytes) -> None:
        if self.connected:
            self.client.publish(f"{self.prefix}/stats", payload, qos=0)

    def stop(self, final_status: bytes, timeout: float = 5.0) -> None:
        """Publish the final status, flush what is queued, disconnect cleanly (no last will)."""
        self.status_payload = final_status
        if self.connected:
            info = self.client.publish(f"{self.prefix}/status", final_status, qos=1, retain=True)
            end = time.monotonic() + timeout
            while time.monotonic() < end and (not info.is_published() or self.held()):
                time.sleep(0.02)
        self._closing = True
        if not self.loop.running():
            self.client.disconnect()
            return
        self.loop.call_soon(self._disconnect)
        self._stopped.wait(2.0)

    def _disconnect(self) -> None:
        if self._sock is None:
            self._stopped.set()
            return
        self.client.disconnect()  # queues DISCONNECT; paho closes the socket once it is written
        self._flush()
        if self.client.socket() is None:
            self._lost()


def _fingerprint(topic: str | None, msg: paho.MQTTMessage) -> tuple[object, ...]:
    """What tells a frame sent again from a new one under the same packet id, for a few microseconds."""
    p = msg.payload
    props = getattr(msg, "properties", None)
    return (topic, len(p), zlib.crc32(p[:1024]), zlib.crc32(p[-1024:]),
            repr(getattr(props, "UserProperty", None)), getattr(props, "CorrelationData", None))
