"""The MQTT adapter: the only module that imports paho-mqtt.

MQTT v5, a persistent session (fixed client id, clean_start off, a session
expiry), manual acknowledgement: a QoS 1 frame is acknowledged to the broker
only once its result has been handed to paho, so a frame the daemon never
answered is redelivered after a restart. Results go out at QoS 1; while the
broker is away paho holds them in its outgoing queue, bounded by
mqtt.result_buffer. Callbacks only translate and hand over; no work in them.
"""
from __future__ import annotations

import json
import logging
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.config import Config
from edged.errors import ConfigError, UnavailableError
from edged.ioloop import IoLoop

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Incoming:
    topic: str
    payload: bytes
    qos: int
    mid: int
    dup: bool
    frame_id: str | None
    response_topic: str | None
    correlation: bytes | None
    content_type: str | None
    expiry_s: int | None


class MqttLink:
    """paho driven by the supervisor's I/O loop (loop_read/loop_write/loop_misc), not by a thread of its own.

    Callbacks (frames, acknowledgements, connection changes) run on the loop
    thread; publish() and ack() may be called from any thread. The one
    blocking step, the TCP (and TLS) connect, runs on a short-lived helper
    thread while the loop keeps serving the workers; reconnects back off from
    1 s to mqtt.reconnect_max_s, as paho's own loop would.
    """

    def __init__(self, cfg: Config, on_frame: Callable[[Incoming], None],
                 on_connection: Callable[[bool], None] | None = None, *, loop: IoLoop) -> None:
        self.cfg = cfg
        self.loop = loop
        self._sock: Any = None  # the socket the loop watches, while connected or connecting
        self._writing = False
        self._connecting = False
        self._delay = 1.0
        self._stopped = threading.Event()
        self.prefix = cfg.prefix
        self.on_frame = on_frame
        self.on_connection = on_connection
        self.connected = False
        self.reconnects = 0
        self.connects = 0
        self.overflows = 0
        self.status_payload = b'{"state": "starting"}'
        # other subscriptions (add_route): (filter, qos, handler); their messages never reach on_frame
        self._routes: list[tuple[str, int, Callable[[str, bytes, bool], None]]] = []
        share = cfg.mqtt.share
        self._frame_prefixes = (f"{self.prefix}/in/",) + ((f"{share.prefix.rstrip('/')}/in/",) if share else ())
        self._lock = threading.RLock()
        m = cfg.mqtt
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
                                  protocol=paho.MQTTv5, manual_ack=True)
        # paho's own queue limit also counts results waiting for their PUBACK: a limit there drops
        # results while connected. The bound is ours instead: results held while the broker is away.
        self.client.max_queued_messages_set(0)
        self._unacked: set[int] = set()
        self._acked_early: dict[int, float] = {}  # mid -> when: acknowledged before publish() recorded it
        self._closing = False
        self.client.max_inflight_messages_set(100)
        self.client.will_set(f"{self.prefix}/status", b'{"state": "offline"}', qos=1, retain=True)
        if m.username:
            self.client.username_pw_set(m.username, self._password())
        if m.tls is not None:
            try:
                self.client.tls_set(ca_certs=m.tls.ca, certfile=m.tls.cert, keyfile=m.tls.key,
                                    cert_reqs=ssl.CERT_REQUIRED)
                self.client.tls_insecure_set(m.tls.insecure)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"{cfg.source} mqtt.tls: {exc}") from None
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_socket_close = self._on_socket_close
        self.client.on_socket_register_write = self._on_register_write
        self.client.on_socket_unregister_write = None
        loop.after_events(self._flush)

    def _password(self) -> str | None:
        pf = self.cfg.mqtt.password_file
        if not pf:
            return None
        try:
            with open(pf, encoding="utf-8") as fh:
                return fh.readline().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{self.cfg.source} mqtt.password_file: cannot read {pf}: {exc.strerror}") from None

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.cfg.mqtt.session_expiry
        # backpressure for QoS 1 frames: the broker holds back what our queue could not take
        props.ReceiveMaximum = min(65535, self.cfg.queue.max_per_stream)
        self.client.connect_async(self.cfg.mqtt.host, self.cfg.mqtt.port, keepalive=self.cfg.mqtt.keepalive,
                                  clean_start=False, properties=props)
        self.loop.call_soon(self._connect_later, 0.0)
        self.loop.call_soon(self._tick)

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
            logger.debug("connecting to %s:%s failed: %s", self.cfg.mqtt.host, self.cfg.mqtt.port, exc)
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
        rc = self.client.loop_read()
        # TLS: bytes already decrypted into the SSL object's buffer do not make the socket readable again;
        # paho's own loop checks pending() for that, and so must we
        sock = self.client.socket()
        pending = getattr(sock, "pending", None)
        while rc == paho.MQTT_ERR_SUCCESS and pending is not None and pending() > 0:
            rc = self.client.loop_read()
        self._check(rc)

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

    def subscriptions(self) -> list[tuple[str, int]]:
        subs = [(f"{self.prefix}/in/+", 1)]
        share = self.cfg.mqtt.share
        if share is not None:
            subs.append((f"$share/{share.group}/{share.prefix.rstrip('/')}/in/+", 1))
        subs.extend((f, q) for f, q, _ in self._routes)
        return subs

    def add_route(self, filters: list[tuple[str, int]], handler: Callable[[str, bytes, bool], None]) -> None:
        """Subscribe to `filters` too (from the next connect on); their messages go to handler(topic, payload,
        retained) on the loop thread, never to admission. Call before start()."""
        self._routes.extend((f, q, handler) for f, q in filters)

    def _on_other(self, msg: paho.MQTTMessage) -> None:
        """A message that is not a frame: to the route whose filter matches, else dropped; never admitted."""
        if msg.qos > 0:
            self.client.ack(msg.mid, msg.qos)
        for filt, _, handler in self._routes:
            if paho.topic_matches_sub(filt, msg.topic):
                try:
                    handler(msg.topic, msg.payload, bool(msg.retain))
                except Exception:  # a hostile message must not stop the I/O loop
                    logger.exception("handling a message on %r failed", msg.topic)
                return
        logger.debug("message on %r matches no subscription of ours; dropped", msg.topic)

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
        self.connects += 1
        if self.connects > 1:
            self.reconnects += 1
        self.connected = True
        logger.info("connected to broker %s:%s (session present: %s)", self.cfg.mqtt.host, self.cfg.mqtt.port,
                    getattr(flags, "session_present", "?"))
        client.subscribe(self.subscriptions())
        client.publish(f"{self.prefix}/status", self.status_payload, qos=1, retain=True)
        if self.on_connection:
            self.on_connection(True)

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int, codes: list[paho.ReasonCode],
                      props: object) -> None:
        bad = [str(c) for c in codes if c.is_failure]
        if bad:
            logger.error("broker refused a subscription: %s", ", ".join(bad))

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: object, rc: paho.ReasonCode,
                       props: object) -> None:
        if self.connected and not self._closing:
            logger.warning("disconnected from broker: %s; reconnecting", rc)
        self.connected = False
        if self.on_connection:
            self.on_connection(False)

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        if self._routes and not msg.topic.startswith(self._frame_prefixes):
            self._on_other(msg)
            return
        p = getattr(msg, "properties", None)
        frame_id = None
        for k, v in getattr(p, "UserProperty", None) or ():
            if k == "frame_id":
                frame_id = v
        self.on_frame(Incoming(msg.topic, msg.payload, msg.qos, msg.mid, bool(msg.dup), frame_id,
                               getattr(p, "ResponseTopic", None), getattr(p, "CorrelationData", None),
                               getattr(p, "ContentType", None), getattr(p, "MessageExpiryInterval", None)))

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, rc: paho.ReasonCode,
                    props: object) -> None:
        with self._lock:
            if mid in self._unacked:
                self._unacked.discard(mid)
            else:  # a status message, or a result acknowledged before publish() could record it
                self._acked_early[mid] = time.monotonic()

    def held(self) -> int:
        """Results handed to paho and not yet acknowledged by the broker."""
        with self._lock:
            return len(self._unacked)

    def publish(self, topic: str, payload: bytes, *, correlation: bytes | None = None) -> bool:
        """Queue a result at the configured QoS; False when the broker is away and mqtt.result_buffer is full."""
        if not self.connected and self.held() >= self.cfg.mqtt.result_buffer:
            with self._lock:
                self.overflows += 1
            return False
        # properties cost a Python-level pack per message: only what request/response needs
        props = None
        if correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
        # never hold our lock across paho's publish: paho calls on_publish under its own lock
        info = self.client.publish(topic, payload, qos=self.cfg.mqtt.qos, properties=props)
        if self.cfg.mqtt.qos > 0:
            with self._lock:
                if self._acked_early.pop(info.mid, None) is None:
                    self._unacked.add(info.mid)
                if len(self._acked_early) > 64:  # only the race window matters: forget the old ones
                    cutoff = time.monotonic() - 5.0
                    self._acked_early = {m: t for m, t in self._acked_early.items() if t > cutoff}
        return True

    def ack(self, mid: int, qos: int) -> None:
        if qos > 0:
            self.client.ack(mid, qos)

    def set_status(self, payload: bytes) -> None:
        """Publish the retained P/status now (if connected) and on every reconnect."""
        self.status_payload = payload
        if self.connected:
            self.client.publish(f"{self.prefix}/status", payload, qos=1, retain=True)

    def publish_message(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """A message that is not a result (discovery, entity states): now if connected, else False (not held)."""
        if not self.connected:
            return False
        self.client.publish(topic, payload, qos=qos, retain=retain)
        return True

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



def send_frame(cfg: Config, payload: bytes, stream: str = "cli", timeout: float = 10.0) -> dict[str, Any]:
    """Send a frame to P/in/<stream> with a private response topic; return the result JSON."""
    token = secrets.token_hex(6)
    reply = f"{cfg.prefix}/reply/{token}"
    got: dict[str, Any] = {}
    subscribed, answered = threading.Event(), threading.Event()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"edged-send-{token}", protocol=paho.MQTTv5)
    if cfg.mqtt.username:
        pw = None
        if cfg.mqtt.password_file:
            with open(cfg.mqtt.password_file, encoding="utf-8") as fh:
                pw = fh.readline().rstrip("\r\n")
        c.username_pw_set(cfg.mqtt.username, pw)
    if cfg.mqtt.tls is not None:
        c.tls_set(ca_certs=cfg.mqtt.tls.ca, certfile=cfg.mqtt.tls.cert, keyfile=cfg.mqtt.tls.key)
        c.tls_insecure_set(cfg.mqtt.tls.insecure)
    c.on_subscribe = lambda *a: subscribed.set()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        try:
            got.update(json.loads(msg.payload))
        except ValueError:
            got["_raw"] = msg.payload.decode("utf-8", "replace")
        answered.set()

    c.on_message = on_message
    try:
        c.connect(cfg.mqtt.host, cfg.mqtt.port, keepalive=30)
    except OSError as exc:
        raise UnavailableError(f"broker {cfg.mqtt.host}:{cfg.mqtt.port} not reachable: {exc}") from None
    c.loop_start()
    try:
        c.subscribe(reply, qos=1)
        if not subscribed.wait(timeout):
            raise UnavailableError(f"broker {cfg.mqtt.host}:{cfg.mqtt.port} did not confirm the subscription")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply
        props.CorrelationData = token.encode()
        props.UserProperty = [("frame_id", f"send-{token}")]
        c.publish(f"{cfg.prefix}/in/{stream}", payload, qos=1, properties=props)
        if not answered.wait(timeout):
            raise UnavailableError(f"no result from edged on {cfg.prefix}/in/{stream} within {timeout:.0f} s")
        return got
    finally:
        c.loop_stop()
        c.disconnect()
