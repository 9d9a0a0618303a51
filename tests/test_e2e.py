"""End to end: a real `edged run`, a real Mosquitto, real models on real images."""
from __future__ import annotations

import io
import json
import subprocess
import threading

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from PIL import Image
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import BUNDLED, ROOT, edged_cmd, shared, until

SAMPLE_CLASS = "7"  # edged/models/MODEL.md: the held-out sample tools/build_model.py picked
CAT_CLASSES = {"tabby", "tiger cat", "egyptian cat", "persian", "siamese"}


def _is_cat(label: str) -> bool:
    return any(c in label.lower() for c in CAT_CLASSES)


def _mnv2() -> dict:
    return {"model": {"path": str(shared("mobilenet_v2_1.0_224_quant.tflite")),
                      "labels": str(shared("imagenet_labels.txt")), "task": "classify", "top_k": 3}}


def test_bundled_model_sample_frame_classified(daemon_factory, client_factory):
    d = daemon_factory()
    c = client_factory(d.prefix)
    c.send((BUNDLED / "digits_sample.png").read_bytes(), "s1")
    res = c.wait(["s1"], 20)["s1"]
    assert res is not None and "error" not in res, res
    top = res["classes"][0]
    assert top["label"] == SAMPLE_CLASS and top["id"] == int(SAMPLE_CLASS) and top["score"] > 0.9, top
    assert res["model"] == "digits" and res["task"] == "classify" and res["accelerator"] == "cpu"
    assert res["_topic"] == f"{d.prefix}/out/cam1"
    assert set(res["timing_ms"]) >= {"queue", "preprocess", "inference", "total"}


def test_mobilenet_v2_cat_all_encodings_give_cat(daemon_factory, client_factory):
    d = daemon_factory(_mnv2())
    c = client_factory(d.prefix)
    img = Image.open(shared("cat.bmp")).convert("RGB")
    jpg, png = io.BytesIO(), io.BytesIO()
    img.save(jpg, "JPEG", quality=90)
    img.save(png, "PNG")
    raw = np.asarray(img.resize((224, 224), Image.Resampling.BILINEAR), dtype=np.uint8).tobytes()
    frames = {"bmp": shared("cat.bmp").read_bytes(), "jpg": jpg.getvalue(), "png": png.getvalue(), "raw": raw}
    for fid, payload in frames.items():
        c.send(payload, fid)
    got = c.wait(list(frames), 30)
    for fid, res in got.items():
        assert res is not None, fid
        assert "error" not in res, res
        assert _is_cat(res["classes"][0]["label"]), (fid, res["classes"])
        assert len(res["classes"]) == 3
    assert got["bmp"]["classes"][0]["id"] == 286 and got["bmp"]["classes"][0]["score"] > 0.7


def test_mobilenet_v2_same_frame_twice_same_answer(daemon_factory, client_factory):
    d = daemon_factory(_mnv2())
    c = client_factory(d.prefix)
    payload = shared("cat.bmp").read_bytes()
    for i in range(3):
        c.send(payload, f"r{i}")
    got = c.wait(["r0", "r1", "r2"], 30)
    assert got["r0"]["classes"] == got["r1"]["classes"] == got["r2"]["classes"]


def test_ssd_detector_finds_person_in_grace_hopper(daemon_factory, client_factory):
    d = daemon_factory({"model": {"path": str(shared("coco_ssd_mobilenet_v1_1.0_quant_2018_06_29_detect.tflite")),
                                  "labels": str(shared("coco_labels.txt")), "task": "detect",
                                  "score_threshold": 0.5}})
    c = client_factory(d.prefix)
    c.send(shared("grace_hopper.bmp").read_bytes(), "gh")
    res = c.wait(["gh"], 30)["gh"]
    assert res is not None and "error" not in res, res
    people = [x for x in res["detections"] if x["label"] == "person"]
    assert people and people[0]["score"] > 0.6
    box = people[0]["box"]
    assert len(box) == 4 and all(0.0 <= v <= 1.0 for v in box)
    assert box[0] < 0.2 and box[2] > 0.9  # the portrait fills the frame top to bottom
    assert all(x["score"] >= 0.5 for x in res["detections"])


def test_raw_task_outputs_every_tensor_dequantized(daemon_factory, client_factory):
    d = daemon_factory({"model": {"path": str(shared("coco_ssd_mobilenet_v1_1.0_quant_2018_06_29_detect.tflite")),
                                  "labels": None, "task": "raw"}})
    c = client_factory(d.prefix)
    c.send(shared("grace_hopper.bmp").read_bytes(), "raw1")
    res = c.wait(["raw1"], 30)["raw1"]
    assert res is not None and "outputs" in res, res
    shapes = [o["shape"] for o in res["outputs"]]
    assert [1, 10, 4] in shapes and [1] in shapes
    for o in res["outputs"]:
        assert len(o["data"]) == int(np.prod(o["shape"]))
        assert all(isinstance(v, (int, float)) for v in o["data"])


def test_bad_frames_get_error_results_then_good_frame_served(daemon_factory, client_factory):
    d = daemon_factory(_mnv2())
    c = client_factory(d.prefix)
    rng = np.random.default_rng(1)
    jpg = io.BytesIO()
    Image.open(shared("cat.bmp")).convert("RGB").save(jpg, "JPEG")
    cases = {
        "empty": b"",
        "noise": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "trunc_jpeg": jpg.getvalue()[: len(jpg.getvalue()) // 3],
        "png_garbage": b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "bmp_huge": b"BM" + b"\xff" * 60,
        "raw_short": bytes(224 * 224 * 3 - 1),
        "ctype_lies": jpg.getvalue(),
    }
    for fid, p in cases.items():
        c.send(p, fid, content_type="application/octet-stream" if fid == "ctype_lies" else None)
    got = c.wait(list(cases), 30)
    for fid, res in got.items():
        assert res is not None, f"{fid} unanswered"
        assert res["error"]["code"] in ("bad_payload", "too_large"), (fid, res)
        assert res["error"]["message"], fid
        assert res["model"] == "mobilenet_v2_1.0_224_quant"
    c.send(jpg.getvalue(), "good")
    good = c.wait(["good"], 20)["good"]
    assert good and _is_cat(good["classes"][0]["label"])
    assert d.proc.poll() is None


def test_request_response_replies_to_response_topic_with_correlation(daemon_factory, broker):
    d = daemon_factory()
    got: dict = {}

    ev, sub = threading.Event(), threading.Event()
    cl = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    cl.on_subscribe = lambda *a: sub.set()

    def on_msg(c, u, m):
        got.update(topic=m.topic, corr=getattr(m.properties, "CorrelationData", None), body=json.loads(m.payload))
        ev.set()

    cl.on_message = on_msg
    cl.connect("127.0.0.1", broker.port)
    cl.loop_start()
    try:
        cl.subscribe("replies/me", qos=1)
        assert sub.wait(10)
        pr = Properties(PacketTypes.PUBLISH)
        pr.ResponseTopic = "replies/me"
        pr.CorrelationData = b"\x01\x02abc"
        cl.publish(f"{d.prefix}/in/rr", (BUNDLED / "digits_sample.png").read_bytes(), qos=1, properties=pr)
        assert ev.wait(20)
    finally:
        cl.loop_stop()
        cl.disconnect()
    assert got["topic"] == "replies/me" and got["corr"] == b"\x01\x02abc"
    assert got["body"]["frame_id"] == b"\x01\x02abc".hex() and got["body"]["stream"] == "rr"


def test_status_json_names_model_input_and_workers(daemon_factory, client_factory):
    d = daemon_factory(_mnv2())
    st = d.status()
    assert st["state"] == "online"
    assert st["model"]["input"] == {"shape": [1, 224, 224, 3], "dtype": "uint8"}
    assert st["model"]["task"] == "classify" and st["model"]["path"].endswith("mobilenet_v2_1.0_224_quant.tflite")
    assert st["workers"][0]["sandboxed"] is True and st["workers"][0]["pid"]
    c = client_factory(d.prefix)
    until(lambda: c.status_msgs, 10, "the retained status message", 0.1)
    assert c.status_msgs[-1]["state"] == "online"


def test_send_cli_prints_result_of_bundled_sample(daemon_factory):
    d = daemon_factory()
    r = subprocess.run(edged_cmd("send", "-c", str(d.cfg_path), str(BUNDLED / "digits_sample.png")),
                       capture_output=True, text=True, timeout=60, env=d.env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["classes"][0]["label"] == SAMPLE_CLASS


def test_sigterm_publishes_stopped_and_exits_zero(daemon_factory, client_factory):
    d = daemon_factory()
    c = client_factory(d.prefix)
    assert d.stop() == 0
    until(lambda: c.status_msgs and c.status_msgs[-1]["state"] == "stopped", 10, "the status `stopped`", 0.1,
          detail=lambda: str(c.status_msgs[-3:]))


@pytest.mark.parametrize("model,word", [("model_invoking_error.tflite", "fake-op-double")])
def test_run_with_unloadable_model_exits_78_naming_cause(tmp_path, broker, daemon_factory, model, word):
    d = daemon_factory({"model": {"path": str(shared(model)), "labels": None, "task": "raw"}}, start=False)
    r = subprocess.run(edged_cmd("run", "-c", str(d.cfg_path)), capture_output=True, text=True, timeout=60, env=d.env)
    assert r.returncode == 78
    assert word in r.stderr and "Traceback" not in r.stderr
