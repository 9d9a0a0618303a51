#!/usr/bin/env python3
"""Model updates on a live daemon (issue 21's figures): time from publish to the first result of the new model,
and frames lost across the swap, on a Mosquitto of our own.

  python tools/bench_update.py [--rounds 6] [--rate 50] [--json]

One stream of cat.bmp frames at --rate frames/s runs throughout. Each round publishes a signed bundle
(edged.bundle, built before the clock starts) alternating digits -> MobileNet v2 -> digits ...; the clock
runs from the PUBLISH (its PUBACK from the broker) to the first result whose `model` is the new one. The
daemon's own split (verify+write, self-test, swap) comes from its status. At the end every frame must have
exactly one answer: lost = frames never answered, errors = error answers, twice = frames answered twice.
Loopback only; everything started here is stopped at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edged import bundle
from edged.broker import Broker
from edged.status import query
import itertools

SHARED = Path(os.environ.get("EDGED_SHARED_MODELS") or ROOT.parent / "shared" / "models")
BUNDLED = ROOT / "edged" / "models"
V2 = "mobilenet_v2_1.0_224_quant"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cat = (SHARED / "cat.bmp").read_bytes()
    with tempfile.TemporaryDirectory() as tmp_s, Broker(Path(tmp_s)) as broker:
        tmp = Path(tmp_s)
        pub = bundle.keygen(str(tmp / "k"))
        key = bundle.load_private_key(str(tmp / "k"))
        prefix = "bench/upd"
        cfg = {"device_id": "upd", "state_dir": str(tmp / "state"),
               "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": prefix},
               "model": {"path": str(BUNDLED / "digits.tflite"), "labels": str(BUNDLED / "digits_labels.txt"),
                         "update": {"enabled": True, "public_key": pub, "probation_s": 0}},
               "status": {"socket": str(tmp / "s.sock"), "interval": 0}, "logging": {"level": "WARNING"}}
        (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
        log = open(tmp / "d.log", "wb")
        d = subprocess.Popen([sys.executable, "-m", "edged", "run", "-c", str(tmp / "c.yaml")],
                             env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log, stderr=subprocess.STDOUT)
        try:
            return run(args, broker, prefix, cat, key, d, tmp)
        finally:
            d.terminate()
            d.wait(30)


def run(args: Any, broker: Broker, prefix: str, cat: bytes, key: Any, d: subprocess.Popen[bytes], tmp: Path) -> int:
    sock = str(tmp / "s.sock")
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            if query(sock, 1).get("state") == "online":
                break
        except Exception:
            pass
        time.sleep(0.1)
    else:
        raise SystemExit("daemon did not come online: " + (tmp / "d.log").read_text()[-2000:])
    results: dict[str, list[dict[str, Any]]] = {}
    arrived: dict[str, float] = {}
    cv = threading.Condition()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-upd", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        body = json.loads(msg.payload)
        with cv:
            fid = str(body.get("frame_id"))
            results.setdefault(fid, []).append(body)
            arrived.setdefault(fid, time.monotonic())
            cv.notify_all()

    c.on_message = on_message
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    c.subscribe(f"{prefix}/out/#", qos=1)
    time.sleep(0.5)  # let the SUBACK land before the first frame (a setup step, not a measurement)
    sent: list[str] = []
    stop = threading.Event()

    def stream() -> None:
        i = 0
        period = 1.0 / args.rate
        nxt = time.monotonic()
        while not stop.is_set():
            fid = f"f{i:06d}"
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = [("frame_id", fid)]
            with cv:
                sent.append(fid)
            c.publish(f"{prefix}/in/cam", cat, qos=1, properties=props)
            i += 1
            nxt += period
            stop.wait(max(0.0, nxt - time.monotonic()))

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    models = [(SHARED / f"{V2}.tflite", V2, SHARED / "imagenet_labels.txt"),
              (BUNDLED / "digits.tflite", "digits", BUNDLED / "digits_labels.txt")]
    rounds = []
    for r in range(args.rounds):
        path, name, labels = models[r % 2]
        payload = bundle.build(path.read_bytes(), r + 1, key, name=name, labels=labels.read_bytes())
        time.sleep(1.0)  # frames of the old model in between rounds
        with cv:
            n_before = len(sent)
        t0 = time.monotonic()
        c.publish(f"{prefix}/model/update", payload, qos=1).wait_for_publish(30)
        t_acked = time.monotonic()

        def first_new(n_before: int = n_before, name: str = name) -> float | None:
            ts = [arrived[f] for f in sent[n_before:] if f in arrived and results[f][0].get("model") == name]
            return min(ts) if ts else None

        with cv:
            cv.wait_for(lambda: first_new() is not None, 120)
            got = first_new()
        if got is None:
            raise SystemExit(f"round {r}: no result of {name}: " + (tmp / "d.log").read_text()[-2000:])
        timing = (query(sock, 5).get("model_update") or {}).get("last_apply_timing") or {}
        rounds.append({"to": name, "bundle_bytes": len(payload), "publish_to_first_result_s": round(got - t0, 3),
                       "publish_to_puback_s": round(t_acked - t0, 3), "daemon": timing})
    time.sleep(1.0)
    stop.set()
    t.join()
    with cv:
        cv.wait_for(lambda: all(f in results for f in sent), 60)
        lost = [f for f in sent if f not in results]
        errors = [f for f in sent if f in results and any("error" in b for b in results[f])]
        twice = [f for f in sent if len(results.get(f, [])) > 1]
        order = [results[f][0]["model"] for f in sent if f in results]
        codes: dict[str, int] = {}
        for f in errors:
            code = next(b["error"]["code"] for b in results[f] if "error" in b)
            codes[code] = codes.get(code, 0) + 1
    switches = sum(1 for a, b in itertools.pairwise(order) if a != b)
    c.loop_stop()
    c.disconnect()
    to_v2 = [x["publish_to_first_result_s"] for x in rounds if x["to"] == V2]
    report = {"rounds": rounds, "frames": len(sent), "lost": len(lost), "errors": len(errors), "error_codes": codes,
              "twice": len(twice),
              "switch_points": switches, "rate": args.rate,
              "to_mobilenet_v2_s": {"median": round(statistics.median(to_v2), 3), "min": min(to_v2), "max": max(to_v2)}}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for x in rounds:
            dm = x["daemon"]
            print(f"-> {x['to']:<28} {x['bundle_bytes'] / 1e6:5.2f} MB  publish->first result "
                  f"{x['publish_to_first_result_s']:.2f} s  (daemon: verify+write {dm.get('verify_write_s')} s, "
                  f"self-test {dm.get('selftest_s')} s, swap {dm.get('swap_s')} s)")
        v = report["to_mobilenet_v2_s"]
        print(f"MobileNet v2: publish -> first result median {v['median']:.2f} s (min {v['min']:.2f}, "
              f"max {v['max']:.2f}) over {len(to_v2)} rounds")
        print(f"frames {len(sent)} at {args.rate:g}/s: lost {len(lost)}, errors {len(errors)} {codes}, answered twice "
              f"{len(twice)}, model switch points {switches} (rounds {len(rounds)})")
    return 0 if not (lost or errors or twice) and switches == len(rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
