"""Home Assistant MQTT discovery: which entities edged announces, their states, and their removal.

One device per daemon (identifiers from device_id), sensors for the daemon's
state, frames per second, p99 latency, errors, pool use and accelerator, and
one sensor per stream in homeassistant.streams with the latest top label
(classify) or the most confident detection's label (detect).

Topics (P is mqtt.topic_prefix, D is homeassistant.discovery_prefix):
- D/sensor/<node>/<object>/config (retained, QoS 1): the discovery configs;
  an empty retained payload removes an entity.
- P/ha/state (retained): figures for the daemon's sensors, on every P/stats.
- P/ha/label/<stream> (retained): {"label", "score", "class_id", "frame_id",
  "model", "ts"} of a listed stream; at once when the label changes, else at
  most once a second (the newest result), so Home Assistant's recorder is
  not asked to store every frame.
- The state sensor reads P/status itself; every other entity is available
  while P/status says starting, online, degraded or stopping.

Configs are published on connect (and so after every reconnect) and again
when D/status says "online" (Home Assistant's birth message). On connect
edged also reads back the retained configs under its own node id and empties
those it no longer announces: a stream removed from the list, or the whole
device when homeassistant.enabled is false, leaves no ghost entity.

This module publishes through a callable it is given and receives messages
from the MQTT link through on_message(); it never sees frames and never
publishes a result.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from typing import Any
from collections.abc import Callable

from edged import __version__
from edged.config import Config

logger = logging.getLogger(__name__)

# publish(topic, payload, qos, retain) -> False when not connected
Publish = Callable[[str, bytes, int, bool], bool]

LABEL_MIN_INTERVAL_S = 1.0  # the same label is republished at most this often (score, frame id)
BIRTH_MIN_INTERVAL_S = 5.0  # D/status "online" floods cost one republish per this interval
MAX_CLEARED = 256  # stale configs emptied per connection: bounded work whatever is retained there
RUNNING = ("starting", "online", "degraded", "stopping")
_SAFE = re.compile(r"[^a-zA-Z0-9_-]")


def object_id(text: str) -> str:
    """A discovery topic level Home Assistant accepts ([a-zA-Z0-9_-]+), distinct for distinct inputs."""
    safe = _SAFE.sub("_", text)
    if safe != text or not safe:
        safe = f"{safe}_{hashlib.sha256(text.encode()).hexdigest()[:6]}".lstrip("_")
    return safe


def node_id(cfg: Config) -> str:
    return object_id(f"edged_{cfg.device_id}")


def _value(key: str) -> str:
    """A state template; an empty payload (the retained state cleared as its entity goes) renders None, quietly."""
    return "{{ value_json." + key + " if value_json is defined else None }}"


def _attrs(expr: str) -> str:
    """An attributes template; an empty payload gives no attributes instead of a template error."""
    return "{% if value_json is defined %}{{ " + expr + " | tojson }}{% else %}{}{% endif %}"


def _label_of(result: dict[str, Any]) -> dict[str, Any] | None:
    """The top class (classify) or the most confident detection (detect); None for raw outputs."""
    if isinstance(result.get("classes"), list):
        items = result["classes"]
    elif isinstance(result.get("detections"), list):
        items = result["detections"]
    else:
        return None
    best = max((i for i in items if isinstance(i, dict)), key=lambda i: float(i.get("score") or 0.0), default=None)
    if best is None:
        return {"label": "none", "score": 0.0, "class_id": None}
    label = best.get("label")
    return {"label": str(label if label not in (None, "") else best.get("id")), "score": best.get("score"),
            "class_id": best.get("id")}


class HomeAssistant:
    """Discovery configs, entity states and removals for one daemon; thread-safe."""

    def __init__(self, cfg: Config, publish: Publish) -> None:
        self._publish = publish
        self._lock = threading.Lock()
        self._last_birth = -BIRTH_MIN_INTERVAL_S
        self._birth_due: float | None = None
        self._cleared: set[str] = set()
        self._state: bytes | None = None  # the latest P/ha/state payload
        self._prev: tuple[float, int] | None = None  # (monotonic, frames completed) at the previous stats
        self._labels: dict[str, dict[str, Any]] = {}  # stream -> latest label payload (listed streams only)
        self._sent: dict[str, tuple[str, float]] = {}  # stream -> (label, when) of the last publish
        self._pending: set[str] = set()  # streams whose newest label waits for LABEL_MIN_INTERVAL_S
        self._configure(cfg)
        self.prefix = cfg.homeassistant.discovery_prefix  # fixed until restart (the link's subscriptions)

    def _configure(self, cfg: Config) -> None:
        self.cfg = cfg
        self.enabled = cfg.homeassistant.enabled
        self.node = node_id(cfg)
        self.base = cfg.prefix
        self.streams = frozenset(cfg.homeassistant.streams) if cfg.model.task != "raw" else frozenset()
        if cfg.homeassistant.streams and cfg.model.task == "raw":
            logger.warning("homeassistant.streams: model.task raw has no label; no stream entities")

    # ---- what the MQTT link needs -------------------------------------------------
    def subscriptions(self) -> list[tuple[str, int]]:
        """Home Assistant's birth topic, and our own retained configs (to remove the stale ones)."""
        return [(f"{self.prefix}/status", 0), (f"{self.prefix}/+/{self.node}/+/config", 0)]

    def owns(self, topic: str) -> bool:
        """True for topics no result may go to: the discovery prefix and P/ha/."""
        return topic == self.prefix or topic.startswith(self.prefix + "/") or topic.startswith(self.base + "/ha/")

    # ---- entities -------------------------------------------------------------------
    def device(self) -> dict[str, Any]:
        return {"identifiers": [f"edged_{self.cfg.device_id}"], "name": f"edged {self.cfg.device_id}",
                "model": "edged", "manufacturer": "edged", "sw_version": __version__}

    def entities(self) -> dict[str, dict[str, Any]]:
        """Discovery topic -> config payload, for everything this daemon announces now ({} when disabled)."""
        if not self.enabled:
            return {}
        status = f"{self.base}/status"
        state = f"{self.base}/ha/state"
        available = [{"topic": status, "value_template":
                      "{{ 'online' if value_json is defined and value_json.state in " + repr(list(RUNNING))
                      + " else 'offline' }}"}]
        common = {"device": self.device(), "origin": {"name": "edged", "sw_version": __version__}}

        def sensor(key: str, name: str, **extra: Any) -> tuple[str, dict[str, Any]]:
            obj = object_id(key)
            cfg = {"name": name, "unique_id": f"edged_{self.cfg.device_id}_{key}",
                   "object_id": f"{self.node}_{obj}", **extra, **common}
            return f"{self.prefix}/sensor/{self.node}/{obj}/config", cfg

        out = dict([
            sensor("state", "State", state_topic=status, value_template=_value("state"),
                   icon="mdi:state-machine"),
            sensor("fps", "Frames per second", state_topic=state, value_template=_value("fps"),
                   unit_of_measurement="frames/s", state_class="measurement", icon="mdi:speedometer",
                   suggested_display_precision=1, availability=available),
            sensor("latency_p99", "Latency p99", state_topic=state, value_template=_value("p99_ms"),
                   unit_of_measurement="ms", device_class="duration", state_class="measurement",
                   suggested_display_precision=1, availability=available),
            sensor("errors", "Errors", state_topic=state, value_template=_value("errors"),
                   state_class="total_increasing", icon="mdi:alert-circle-outline", entity_category="diagnostic",
                   json_attributes_topic=state, json_attributes_template=_attrs("value_json.errors_by_code"),
                   availability=available),
            sensor("pool", "Frame pool use", state_topic=state, value_template=_value("pool_used_pct"),
                   unit_of_measurement="%", state_class="measurement", icon="mdi:memory",
                   entity_category="diagnostic", json_attributes_topic=state,
                   json_attributes_template=_attrs("value_json.pool"), availability=available),
            sensor("accelerator", "Accelerator", state_topic=state, value_template=_value("accelerator"),
                   icon="mdi:chip", entity_category="diagnostic", json_attributes_topic=state,
                   json_attributes_template=_attrs("{'reason': value_json.accelerator_reason, "
                                                          "'skipped': value_json.accelerator_skipped}"),
                   availability=available),
        ])
        for stream in sorted(self.streams):
            topic = f"{self.base}/ha/label/{stream}"
            out.update([sensor(f"label_{stream}", f"Label {stream}", state_topic=topic,
                               value_template=_value("label"), json_attributes_topic=topic,
                               json_attributes_template=_attrs("{'score': value_json.score, 'class_id': "
                                                               "value_json.class_id, 'frame_id': value_json.frame_id, "
                                                               "'model': value_json.model}"),
                               icon="mdi:label-outline", availability=available)])
        return out

    # ---- hooks the daemon calls ----------------------------------------------------------
    def on_connect(self) -> None:
        """Connected (first time or again): announce everything, restate the latest figures."""
        with self._lock:
            self._cleared = set()
        self._announce()

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """A message on one of subscriptions(): Home Assistant's birth, or a retained config of our node."""
        if topic == f"{self.prefix}/status":
            if payload.strip() == b"online" and self.enabled:
                now = time.monotonic()
                with self._lock:
                    self._birth_due = max(now, self._last_birth + BIRTH_MIN_INTERVAL_S)
                self.poll(now)
            return
        if not payload or not topic.endswith("/config") or topic in self.entities():
            return  # an empty one is already removed; one we announce stays
        with self._lock:
            if topic in self._cleared or len(self._cleared) >= MAX_CLEARED:
                return
            self._cleared.add(topic)
        logger.info("homeassistant: removing %s (no longer announced)", topic)
        self._publish(topic, b"", 1, True)
        try:  # its retained state under P/ha/ goes too
            old = json.loads(payload)
            st = old.get("state_topic") or old.get("stat_t") if isinstance(old, dict) else None
        except (ValueError, UnicodeDecodeError, AttributeError):
            st = None
        if isinstance(st, str) and st.startswith(f"{self.base}/ha/") and "+" not in st and "#" not in st:
            self._publish(st, b"", 0, True)

    def on_result(self, result: dict[str, Any]) -> None:
        """A result that was published; only listed streams cost more than a set lookup."""
        stream = result.get("stream")
        if stream not in self.streams or not self.enabled:
            return
        best = _label_of(result)
        if best is None:
            return
        payload = {**best, "frame_id": result.get("frame_id"), "model": result.get("model"), "ts": result.get("ts")}
        now = time.monotonic()
        with self._lock:
            self._labels[stream] = payload
            sent = self._sent.get(stream)
            due = sent is None or sent[0] != payload["label"] or now - sent[1] >= LABEL_MIN_INTERVAL_S
            if not due:
                self._pending.add(stream)
                return
            self._pending.discard(stream)
            self._sent[stream] = (payload["label"], now)
        self._publish(f"{self.base}/ha/label/{stream}", json.dumps(payload).encode(), 0, True)

    def on_stats(self, st: dict[str, Any]) -> None:
        """The status snapshot of each P/stats: the daemon's figures on P/ha/state."""
        now = time.monotonic()
        frames = st.get("frames") or {}
        done = int(frames.get("completed") or 0)
        prev, self._prev = self._prev, (now, done)
        if prev is not None and now > prev[0]:
            fps = max(0, done - prev[1]) / (now - prev[0])
        else:
            up = float(st.get("uptime_s") or 0)
            fps = done / up if up > 0 else 0.0
        pool = st.get("pool") or {}
        cap = pool.get("capacity_bytes") or 0
        acc = st.get("accelerator") or {}
        skipped = [s for s in acc.get("skipped") or [] if isinstance(s, dict)]
        aside = [s for s in acc.get("set_aside") or [] if isinstance(s, dict)]
        reasons = [f"{s.get('kind')}: {s.get('reason')}" for s in aside + skipped]
        payload = {"state": st.get("state"), "fps": round(fps, 2),
                   "p99_ms": (st.get("latency_ms") or {}).get("p99", 0.0),
                   "errors": int(frames.get("errors") or 0), "errors_by_code": st.get("errors_by_code") or {},
                   "pool_used_pct": round(100.0 * (pool.get("used_bytes") or 0) / cap, 1) if cap else 0.0,
                   "pool": {k: pool.get(k) for k in ("capacity_bytes", "used_bytes", "high_water_bytes")},
                   "accelerator": acc.get("chosen"), "accelerator_reason": "; ".join(reasons) or None,
                   "accelerator_skipped": skipped, "ts": round(time.time(), 3)}
        data = json.dumps(payload).encode()
        with self._lock:
            self._state = data
        if self.enabled:
            self._publish(f"{self.base}/ha/state", data, 0, True)

    def poll(self, now: float | None = None) -> None:
        """From the daemon's timer loop: a due birth republish, labels held back by the rate limit."""
        now = time.monotonic() if now is None else now
        with self._lock:
            birth = self._birth_due is not None and now >= self._birth_due
            if birth:
                self._birth_due = None
                self._last_birth = now
            flush = [s for s in self._pending if now - self._sent.get(s, ("", 0.0))[1] >= LABEL_MIN_INTERVAL_S]
            out = []
            for s in flush:
                self._pending.discard(s)
                self._sent[s] = (self._labels[s]["label"], now)
                out.append((s, json.dumps(self._labels[s]).encode()))
        if birth:
            logger.info("homeassistant: %s/status is online; announcing again", self.prefix)
            self._announce()
        for s, data in out:
            self._publish(f"{self.base}/ha/label/{s}", data, 0, True)

    def reconfigure(self, cfg: Config) -> None:
        """After a reload (SIGHUP): announce what is new, empty what is gone (discovery_prefix: at restart)."""
        before = self.entities()
        old_streams = self.streams
        if cfg.homeassistant.discovery_prefix != self.prefix:
            logger.warning("reload: homeassistant.discovery_prefix changes take effect at the next restart")
        with self._lock:
            self._configure(cfg)
            for s in list(self._labels):
                if s not in self.streams:
                    self._labels.pop(s, None)
                    self._sent.pop(s, None)
                    self._pending.discard(s)
        now = self.entities()
        for topic in before.keys() - now.keys():
            self._publish(topic, b"", 1, True)
        for s in old_streams - (self.streams if self.enabled else frozenset()):
            self._publish(f"{self.base}/ha/label/{s}", b"", 0, True)
        if now:
            self._announce()

    # ---- publishing -------------------------------------------------------------------
    def _announce(self) -> None:
        ents = self.entities()
        for topic, cfg in ents.items():
            self._publish(topic, json.dumps(cfg, separators=(",", ":")).encode(), 1, True)
        if not ents:
            return
        with self._lock:
            state = self._state
            labels = {s: json.dumps(p).encode() for s, p in self._labels.items()}
        if state is not None:
            self._publish(f"{self.base}/ha/state", state, 0, True)
        for s, data in labels.items():
            self._publish(f"{self.base}/ha/label/{s}", data, 0, True)
