#!/usr/bin/env python3
"""What careless and hostile publishers cost a live daemon (issue 16's figures), on a Mosquitto of our own.

  python tools/bench_hostile.py [--streams 20000] [--flood 100000] [--json]

1. Supervisor CPU per frame on one steady stream, before and after --streams other stream names were
   seen (one frame each): the ratio shows whether dispatch cost depends on how many names were ever seen.
2. Supervisor RSS before and after those stream names (after the daemon's idle heap trim).
3. Peak supervisor RSS (sampled every 5 ms) while a 200 MiB frame is refused.
4. --flood QoS 0 frames published as fast as one client can: answers received, and every missing one
   accounted for by the daemon's counters (results_lost) or by the broker (frames it never delivered).
Loopback only; everything started here is stopped at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edged.broker import Broker  # noqa: E402
from edged.status import query  # noqa: E402

RAW = np.zeros((1, 8, 8, 1), np.uint8).tobytes()


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.broker = Broker(tmp, extra=["max_queued_messages 1000000", "sys_interval 1"]).start()
        self.sock = str(tmp / "edged.sock")
        cfg = {"device_id": "bench", "mqtt": {"host": "127.0.0.1", "port": self.broker.port,
                                               "topic_prefix": "bench/h"},
               "model": {"path": str(ROOT / "edged/models/digits.tflite"),
                         "labels": str(ROOT / "edged/models/digits_labels.txt")},
               "status": {"socket": self.sock, "interval": 0}, "logging": {"level": "WARNING"},
               "queue": {"max_streams": 256}}
        path = tmp / "edged.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.proc = subprocess.Popen([sys.executable, "-m", "edged", "run", "-c", str(path)],
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=open(tmp / "edged.log", "ab"),
                                     stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.proc.pid)
        self.answers = 0
        self.cv = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.max_inflight_messages_set(1000)
        self.c.max_queued_messages_set(0)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", self.broker.port)
        self.c.loop_start()
        self.c.subscribe("bench/h/out/#", qos=0)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = self.status()
            if st and st.get("state") == "online":
                return
            time.sleep(0.1)
        raise RuntimeError("daemon not online")

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        with self.cv:
            self.answers += 1
            self.cv.notify_all()

    def status(self) -> dict[str, Any] | None:
        try:
            return query(self.sock, timeout=5)
        except Exception:
            return None

    def wait_answers(self, n: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        with self.cv:
            while self.answers < n and time.monotonic() < deadline:
                self.cv.wait(0.5)
            return self.answers

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return t.user + t.system

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def steady(self, n: int, window: int = 4) -> float:
        """Supervisor CPU ms per frame on one stream, `window` frames in flight."""
        start = self.answers
        c0 = self.cpu()
        for i in range(n):
            self.c.publish("bench/h/in/steady", RAW, qos=1)
            if i >= window:
                self.wait_answers(start + i - window + 1, 30)
        self.wait_answers(start + n, 30)
        return (self.cpu() - c0) * 1e3 / n

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.broker.close()


class Counter:
    """A client of its own that counts the answers (QoS 1: the broker queues rather than drops them) and
    reads the broker's own count of messages it dropped ($SYS)."""

    def __init__(self, port: int) -> None:
        self.n = 0
        self.dropped: int | None = None
        self.cv = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_message = self._on
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe([("bench/h/out/flood", 1), ("$SYS/broker/publish/messages/dropped", 0)])

    def _on(self, c: Any, u: Any, msg: Any) -> None:
        with self.cv:
            if msg.topic.startswith("$SYS"):
                self.dropped = int(msg.payload)
            else:
                self.n += 1
            self.cv.notify_all()

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def flood(rig: Rig, n: int) -> dict[str, Any]:
    counter = Counter(rig.broker.port)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.max_queued_messages_set(0)
    pub.connect("127.0.0.1", rig.broker.port)
    pub.loop_start()
    try:
        time.sleep(2.5)  # not a synchronisation: the broker's first $SYS report (sys_interval 1) arrives
        dropped0 = counter.dropped or 0
        st0 = rig.status() or {}
        t0 = time.monotonic()
        for _ in range(n):
            pub.publish("bench/h/in/flood", RAW, qos=0)
        sent_s = time.monotonic() - t0
        last, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 5 and last < n:  # until the answers stop coming
            with counter.cv:
                counter.cv.wait(1)
                got = counter.n
            if got != last:
                last, stable_since = got, time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the daemon's answers all out and acknowledged by the broker
            m = (rig.status() or {}).get("mqtt", {})
            if not m.get("results_waiting") and not m.get("results_unacked"):
                break
            time.sleep(0.2)
        while True:  # and all of them delivered to the counter: no new one for 2 s
            n_before = counter.n
            time.sleep(2.0)
            if counter.n == n_before:
                break
        st1 = rig.status() or {}
    finally:
        pub.loop_stop()
        pub.disconnect()
        counter.close()
    f0, f1 = st0.get("frames", {}), st1.get("frames", {})
    received = f1.get("received", 0) - f0.get("received", 0)
    lost = f1.get("results_lost", 0) - f0.get("results_lost", 0)
    broker_dropped = (counter.dropped or 0) - dropped0
    e0, e1 = st0.get("errors_by_code", {}), st1.get("errors_by_code", {})
    return {"sent": n, "publish_s": round(sent_s, 2), "delivered_to_daemon": received,
            "broker_dropped_before_edged": n - received, "broker_dropped_count_sys": broker_dropped,
            "answers_received": counter.n, "served": f1.get("completed", 0) - f0.get("completed", 0),
            "overloaded_answers": e1.get("overloaded", 0) - e0.get("overloaded", 0),
            "results_lost_counted_by_edged": lost,
            "missing_uncounted": received - counter.n - lost}


def idle_rss(rig: Rig) -> int:
    time.sleep(4)  # the daemon trims its heap after 2 s idle: measure what it keeps at rest
    return rig.rss()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=20000)
    ap.add_argument("--flood", type=int, default=100000)
    ap.add_argument("--steady", type=int, default=3000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rig = Rig(Path(tmp))
        try:
            rig.steady(500)  # warm-up
            base = [rig.steady(args.steady) for _ in range(3)]
            rss0 = idle_rss(rig)
            start = rig.answers
            for i in range(args.streams):
                rig.c.publish(f"bench/h/in/ts{i}", RAW, qos=1)
                if i % 200 == 199:
                    rig.wait_answers(start + i - 100, 60)
            rig.wait_answers(start + args.streams, 120)
            after = [rig.steady(args.steady) for _ in range(3)]
            rss1 = idle_rss(rig)
            st = rig.status() or {}
            out["cpu_ms_per_frame_before"] = round(min(base), 4)
            out["cpu_ms_per_frame_after"] = round(min(after), 4)
            out["cpu_ratio_after_vs_before"] = round(min(after) / min(base), 3)
            out["stream_names_seen"] = args.streams + 1
            out["streams_holding_state_after"] = st.get("streams_queued")
            out["rss_mib_before"] = round(rss0 / 2**20, 1)
            out["rss_mib_after"] = round(rss1 / 2**20, 1)
            out["rss_growth_mib"] = round((rss1 - rss0) / 2**20, 2)

            # a 200 MiB frame: the broker drops it for us (our Maximum Packet Size); sample RSS meanwhile
            peak = [rss1]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak[0] = max(peak[0], rig.rss())
                    time.sleep(0.005)

            t = threading.Thread(target=sample, daemon=True)
            t.start()
            big = os.urandom(1 << 20) * 200
            rig.c.publish("bench/h/in/big", big, qos=1).wait_for_publish(120)
            del big
            n0 = rig.answers
            rig.c.publish("bench/h/in/steady", RAW, qos=1)  # the sentinel: its answer means the big one went by
            rig.wait_answers(n0 + 1, 60)
            stop.set()
            t.join()
            out["peak_rss_mib_during_200mib_frame"] = round(peak[0] / 2**20, 1)
            out["peak_over_rest_mib"] = round((peak[0] - rss1) / 2**20, 2)

            # the flood: QoS 0 as fast as one client can publish; answers read by a QoS 1 subscriber of its own
            out["flood"] = flood(rig, args.flood)
        finally:
            rig.close()
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:36} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
