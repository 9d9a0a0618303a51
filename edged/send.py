"""`edged send`: the command line's one-shot MQTT client (one frame out, its result back).

It sets up TLS and authentication through the daemon's own helper
(edged.mqtt.new_client) and turns every failure, the broker's and the
client library's, into UnavailableError (exit 69) or ConfigError (exit 78).
"""
from __future__ import annotations

import json
import secrets
import threading
from typing import Any

from edged import mqtt
from edged.config import Config
from edged.errors import UnavailableError


def send_frame(cfg: Config, payload: bytes, stream: str = "cli", timeout: float = 10.0) -> dict[str, Any]:
    """Send a frame to P/in/<stream> with a private response topic; return the result JSON."""
    token = secrets.token_hex(6)
    reply = f"{cfg.prefix}/reply/{token}"
    got: dict[str, Any] = {}
    subscribed, answered = threading.Event(), threading.Event()
    c = mqtt.new_client(cfg, f"edged-send-{token}")
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
    except (OSError, ValueError) as exc:
        raise UnavailableError(f"broker {cfg.mqtt.host}:{cfg.mqtt.port} not reachable: {exc}") from None
    c.loop_start()
    try:
        c.subscribe(reply, qos=1)
        if not subscribed.wait(timeout):
            raise UnavailableError(f"broker {cfg.mqtt.host}:{cfg.mqtt.port} did not confirm the subscription")
        props = mqtt.request_properties(reply, token.encode(), f"send-{token}")
        try:
            c.publish(f"{cfg.prefix}/in/{stream}", payload, qos=1, properties=props)
        except ValueError as exc:
            raise UnavailableError(f"cannot publish to {cfg.prefix}/in/{stream}: {exc}") from None
        if not answered.wait(timeout):
            raise UnavailableError(f"no result from edged on {cfg.prefix}/in/{stream} within {timeout:.0f} s")
        return got
    finally:
        c.loop_stop()
        c.disconnect()
