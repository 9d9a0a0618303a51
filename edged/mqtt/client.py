"""The paho client as edged configures it: TLS, authentication, the subscription and request shapes.

`new_client()` is the one place that sets up TLS and authentication, for the
daemon and for `edged send` alike; its errors become ConfigError.
"""
from __future__ import annotations

import ssl

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edged import userfiles
from edged.config import Config
from edged.errors import ConfigError


PACKET_HEADROOM = 64 << 10  # topic and properties around a frame's payload
OVERSIZE_FACTOR = 2  # Maximum Packet Size = this x queue.max_frame_bytes + headroom
MAX_PACKET = 268_435_455  # MQTT's own limit
EVENTS_HELD = 100  # P/events messages kept while the broker is away


def _password(cfg: Config) -> str | None:
    pf = cfg.mqtt.password_file
    if not pf:
        return None
    try:
        return userfiles.first_line(pf)
    except userfiles.FileRefused as exc:
        raise ConfigError(f"{cfg.source} mqtt.password_file: {exc}") from None


def new_client(cfg: Config, client_id: str, *, manual_ack: bool = False) -> paho.Client:
    """A paho v5 client with the config's TLS (certificates required) and username/password."""
    m = cfg.mqtt
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                         manual_ack=manual_ack)
    if m.username:
        client.username_pw_set(m.username, _password(cfg))
    if m.tls is not None:
        try:
            client.tls_set(ca_certs=m.tls.ca, certfile=m.tls.cert, keyfile=m.tls.key, cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(m.tls.insecure)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"{cfg.source} mqtt.tls: {exc}") from None
    return client


def share_filter(cfg: Config) -> str | None:
    """The fleet's shared-subscription filter ($share/G/F/in/+), or None without mqtt.share."""
    share = cfg.mqtt.share
    return None if share is None else f"$share/{share.group}/{share.prefix.rstrip('/')}/in/+"


def frame_subscription(topic_filter: str) -> tuple[str, SubscribeOptions]:
    """A frame filter at QoS 1; retained frames only with a new subscription: a retained frame is answered
    once, not at every start (the persistent session keeps the subscription; a shared one gets none)."""
    return topic_filter, SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)


def request_properties(reply_topic: str, correlation: bytes, frame_id: str) -> Properties:
    """PUBLISH properties of a request: where to answer, what to echo, which frame."""
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply_topic
    props.CorrelationData = correlation
    props.UserProperty = [("frame_id", frame_id)]
    return props
