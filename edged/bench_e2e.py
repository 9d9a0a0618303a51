"""`edged bench`'s end-to-end path: publisher -> Mosquitto -> `edged run` -> subscriber, frames in flight."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from edged.benchpaths import Windowed
from edged.broker import Broker
from edged.config import Config


class E2EPath(Windowed):
    """Publisher -> Mosquitto -> `edged run` -> subscriber."""

    name = "e2e"

    def __init__(self, cfg: Config, payload: bytes, window: int, name: str = "e2e",
                 model_overrides: dict[str, Any] | None = None) -> None:
        import paho.mqtt.client as paho
        import yaml

        from edged.status import query

        super().__init__(window)
        self.name = name
        self.payload = payload
        self.tmp = Path(tempfile.mkdtemp(prefix="edged-bench-"))
        self.broker = Broker(self.tmp).start()  # UnavailableError: the e2e paths are skipped, with the reason
        port = self.broker.port
        raw_cfg = yaml.safe_load(Path(cfg.source).read_text()) or {}
        raw_cfg["device_id"] = "bench"
        raw_cfg.setdefault("mqtt", {}).update({"host": "127.0.0.1", "port": port, "topic_prefix": "bench/{device_id}",
                                               "share": None})
        raw_cfg.setdefault("model", {}).update({"path": cfg.model.path, "labels": cfg.model.labels,
                                                **(model_overrides or {})})
        raw_cfg.setdefault("status", {}).update({"socket": str(self.tmp / "s.sock"), "interval": 0,
                                                 "prometheus_file": None})
        (self.tmp / "c.yaml").write_text(yaml.safe_dump(raw_cfg))
        t_launch = time.perf_counter()
        self.daemon = subprocess.Popen([sys.executable, "-m", "edged", "run", "-c", str(self.tmp / "c.yaml")],
                                       stdout=subprocess.DEVNULL,
                                       stderr=open(self.tmp / "daemon.log", "w"))  # noqa: SIM115 (the child's)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if query(str(self.tmp / "s.sock"), 2).get("state") == "online":
                    break
            except Exception:  # not listening yet
                pass
            time.sleep(0.01)
        self.cold_start_s = round(time.perf_counter() - t_launch, 3)
        self.paho = paho
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        subscribed = threading.Event()
        self.c.on_connect = lambda cl, *a: cl.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.on_message = lambda cl, u, msg: self.done(int(json.loads(msg.payload)["frame_id"]))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe("bench/bench/out/#", 1)
        subscribed.wait(10)
        self.pids = [os.getpid(), self.daemon.pid, self.broker.pid,
                     *[p.pid for p in psutil.Process(self.daemon.pid).children()]]

    def submit(self, seq: int) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        p = Properties(PacketTypes.PUBLISH)
        p.UserProperty = [("frame_id", str(seq))]
        self.c.publish("bench/bench/in/b", self.payload, qos=1, properties=p)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()
        self.daemon.send_signal(signal.SIGTERM)
        try:
            self.daemon.wait(20)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
        self.broker.close()
