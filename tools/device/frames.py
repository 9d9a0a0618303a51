"""The host's side of the MQTT conversation with the device's Mosquitto (through a loopback-forwarded port).

Publishes frames (QoS 1, MQTT v5, user property frame_id) and collects the
results by frame id; reads the retained status. Only the contract's topics
are used, so this keeps working whatever the daemon does inside.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class Frames:
    def __init__(self, port: int, prefix: str) -> None:
        self.prefix = prefix
        self.results: dict[str, list[dict[str, Any]]] = {}
        self.status: dict[str, Any] | None = None
        self.cond = threading.Condition()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"device-check-{time.monotonic_ns()}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        self.wait(lambda: self.connected, 30, "connect to the device's broker")

    connected = False

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        client.subscribe([(f"{self.prefix}/out/#", 1), (f"{self.prefix}/status", 1)])
        with self.cond:
            self.connected = True
            self.cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            body = {"unparsable": msg.payload[:200].decode(errors="replace")}
        with self.cond:
            if msg.topic == f"{self.prefix}/status":
                self.status = body
            else:
                self.results.setdefault(str(body.get("frame_id")), []).append(body)
            self.cond.notify_all()

    def wait(self, pred: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout:.0f} s waiting to {what}")
                self.cond.wait(min(left, 1.0))

    def send(self, frame_id: str, payload: bytes, stream: str = "cam1") -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = ("frame_id", frame_id)
        info = self.client.publish(f"{self.prefix}/in/{stream}", payload, qos=1, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"publish of frame {frame_id} failed: {mqtt.error_string(info.rc)}")

    def answered(self, ids: list[str]) -> int:
        with self.cond:
            return sum(1 for i in ids if i in self.results)

    def wait_all(self, ids: list[str], timeout: float, what: str = "results") -> None:
        self.wait(lambda: all(i in self.results for i in ids), timeout,
                  f"{what} ({self.answered(ids)}/{len(ids)} answered)")

    def first(self, frame_id: str) -> dict[str, Any]:
        with self.cond:
            return self.results[frame_id][0]

    def errors(self, ids: list[str]) -> list[dict[str, Any]]:
        with self.cond:
            return [r for i in ids for r in self.results.get(i, []) if "error" in r]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
