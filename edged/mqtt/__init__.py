"""The MQTT adapter: the only package that imports paho-mqtt, and where its errors become MqttError.

edged.mqtt.client: the paho client as configured (TLS, authentication) and
the shapes of subscriptions and requests; edged.mqtt.drive: the
connection's life on the supervisor's I/O loop; edged.mqtt.sockbuf: the
receive buffer under paho; edged.mqtt.link: the daemon's link (frames in,
results and acknowledgements out).
"""
from __future__ import annotations

from edged.mqtt.client import (EVENTS_HELD, MAX_PACKET, OVERSIZE_FACTOR, PACKET_HEADROOM, frame_subscription,
                               new_client, request_properties, share_filter)
from edged.mqtt.link import MqttLink

__all__ = ["EVENTS_HELD", "MAX_PACKET", "OVERSIZE_FACTOR", "PACKET_HEADROOM", "MqttLink", "frame_subscription",
           "new_client", "request_properties", "share_filter"]
