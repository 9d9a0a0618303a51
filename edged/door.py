"""The door: what an incoming frame message may carry, checked and capped before anything else sees it.

Everything in a frame message is untrusted (INTERFACE.md "Every publisher is
a stranger"): the topic (its stream name), the payload and every MQTT v5
property. `Door.inspect()` turns one message into an `Incoming` that carries
only checked values, and, when something is not acceptable, the reason it is
answered `bad_request`: a stream name over 128 bytes or with control
characters (answered on P/out/_invalid), a Response Topic that is not a valid
publish topic, is not allowed by `mqtt.response_topics` or lies on the
daemon's own topics or the Home Assistant discovery prefix (answered on the
default out topic), Correlation Data over 4096 bytes, a `frame_id` over 256
characters or with control characters, a Content Type over 256 characters.
It never raises and imports no MQTT library: it reads the message's fields.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edged.config import Config

MAX_STREAM_BYTES = 128
MAX_CORRELATION = 4096
MAX_FRAME_ID = 256
MAX_CONTENT_TYPE = 256
MAX_TOPIC_BYTES = 65535
INVALID_STREAM = "_invalid"
# the daemon's own topics under P (ha: its Home Assistant entity states): never a destination for a result
OWN_LEVELS = ("in", "status", "stats", "events", "model", "ha")


@dataclass(slots=True)
class Incoming:
    """One frame message as admission may see it: checked fields, and `refusal` when it is a bad request."""

    stream: str
    out_topic: str  # the default answer topic, P/out/<stream>
    payload: bytes
    qos: int
    mid: int
    retain: bool = False
    frame_id: str | None = None
    reply_topic: str | None = None  # an accepted Response Topic
    correlation: bytes | None = None
    content_type: str | None = None
    expiry_s: int | None = None
    refusal: str | None = None
    # how to acknowledge it, when not through the daemon's own (persistent) connection: a fleet frame is
    # acknowledged on the connection it came in on, and only while that connection lasts (edged.fleet)
    ack: Callable[[int, int], None] | None = None


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def filter_matches(filt: str, topic: str) -> bool:
    """MQTT topic filter matching (`+` one level, `#` the rest); `$` topics match only explicit filters."""
    if topic.startswith("$") and not filt.startswith("$"):
        return False
    f_levels, t_levels = filt.split("/"), topic.split("/")
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels) or (level != "+" and level != t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


def valid_publish_topic(topic: str) -> str | None:
    """Why `topic` cannot be published to, or None."""
    if not topic:
        return "is empty"
    if len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        return "is longer than MQTT's 65,535 bytes"
    if "+" in topic or "#" in topic:
        return "holds a wildcard (+ or #)"
    if "\0" in topic or _has_control(topic):
        return "holds control characters"
    if topic.startswith("$"):
        return "is a $ topic (broker-reserved)"
    return None


class Door:
    """The checks of one daemon's configuration: its prefixes, its reply rules."""

    def __init__(self, cfg: Config, discovery_prefix: str | None = None) -> None:
        self.prefixes = [cfg.prefix]
        if cfg.mqtt.share is not None:
            self.prefixes.append(cfg.mqtt.share.prefix.rstrip("/"))
        self.response_filters = tuple(cfg.mqtt.response_topics)
        forbidden = [f"{cfg.prefix}/{level}" for level in OWN_LEVELS]
        if cfg.mqtt.share is not None:
            forbidden.append(f"{cfg.mqtt.share.prefix.rstrip('/')}/in")
        if discovery_prefix:
            forbidden.append(discovery_prefix.rstrip("/"))
        self.forbidden = tuple(forbidden)

    def route(self, topic: str) -> tuple[str, str] | None:
        """(stream, default out topic) of a frame topic, or None when it is not one of ours."""
        for p in self.prefixes:
            if topic.startswith(p + "/in/"):
                stream = topic[len(p) + 4 :]
                return stream, f"{p}/out/{stream}"
        return None

    def reply_refusal(self, topic: str) -> str | None:
        why = valid_publish_topic(topic)
        if why is not None:
            return f"Response Topic {topic[:64]!r} {why}"
        for own in self.forbidden:
            if topic == own or topic.startswith(own + "/"):
                return f"Response Topic {topic[:64]!r} lies on edged's own topics ({own}/...)"
        if not any(filter_matches(f, topic) for f in self.response_filters):
            return f"Response Topic {topic[:64]!r} is not allowed by mqtt.response_topics"
        return None

    def inspect(self, topic: str | None, payload: bytes, qos: int, mid: int, retain: bool,
                props: Any) -> Incoming | None:
        """The checked message, or None when the topic is not a frame topic of ours."""
        routed = self.route(topic) if topic is not None else None
        if routed is None:
            if topic is not None:
                return None
            routed = ("", "")  # the topic was not UTF-8: a stream name we refuse below
        stream, out_topic = routed
        inc = Incoming(stream=stream, out_topic=out_topic, payload=payload, qos=qos, mid=mid, retain=retain)
        problems: list[str] = []
        if (not stream or len(stream.encode("utf-8", "surrogatepass")) > MAX_STREAM_BYTES or _has_control(stream)
                or "/" in stream):
            problems.append(f"stream name {stream[:40]!r} must be 1-{MAX_STREAM_BYTES} bytes without control "
                            "characters")
            inc.stream = INVALID_STREAM
            inc.out_topic = f"{self.prefixes[0]}/out/{INVALID_STREAM}"
        if props is not None:
            self._properties(inc, props, problems)
        if problems:
            inc.refusal = "; ".join(problems)
        return inc

    def _properties(self, inc: Incoming, props: Any, problems: list[str]) -> None:
        for key, value in getattr(props, "UserProperty", None) or ():
            if key == "frame_id":
                if not isinstance(value, str) or len(value) > MAX_FRAME_ID or _has_control(value):
                    problems.append(f"frame_id must be at most {MAX_FRAME_ID} characters without control characters")
                else:
                    inc.frame_id = value
                break
        corr = getattr(props, "CorrelationData", None)
        if corr is not None:
            if not isinstance(corr, (bytes, bytearray)) or len(corr) > MAX_CORRELATION:
                problems.append(f"Correlation Data must be at most {MAX_CORRELATION} bytes")
            else:
                inc.correlation = bytes(corr)
        ctype = getattr(props, "ContentType", None)
        if ctype is not None:
            if not isinstance(ctype, str) or len(ctype) > MAX_CONTENT_TYPE or _has_control(ctype):
                problems.append(f"Content Type must be at most {MAX_CONTENT_TYPE} characters")
            else:
                inc.content_type = ctype
        expiry = getattr(props, "MessageExpiryInterval", None)
        if isinstance(expiry, int) and expiry > 0:
            inc.expiry_s = expiry
        reply = getattr(props, "ResponseTopic", None)
        if reply is not None:
            why = self.reply_refusal(reply) if isinstance(reply, str) else "Response Topic is not text"
            if why is None:
                inc.reply_topic = reply
            else:
                problems.append(why)
