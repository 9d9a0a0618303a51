"""Home Assistant discovery against a real Mosquitto and a real `edged run`, checked by Home Assistant's own
code: the retained messages a subscriber sees go through tools/ha_validate.py in .venv-ha (the pinned
homeassistant release from PyPI, tools/ha_venv.sh), which runs HA's discovery steps, the sensor
DISCOVERY_SCHEMA and HA's template rendering over them."""
from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import BUNDLED, ROOT, Broker, free_port
from edged import config
from edged.errors import ConfigError
from edged.homeassistant import HomeAssistant, node_id, object_id

SAMPLE = (BUNDLED / "digits_sample.png").read_bytes()
DAEMON_KEYS = {"state", "fps", "latency_p99", "errors", "pool", "accelerator"}
HA_PYTHON = ROOT / ".venv-ha" / "bin" / "python"


@pytest.fixture(scope="module")
def ha_python() -> Path:
    """The Home Assistant venv (created once, then cached by its stamp file)."""
    r = subprocess.run([str(ROOT / "tools" / "ha_venv.sh")], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"tools/ha_venv.sh failed: {r.stderr[-2000:]}"
    return HA_PYTHON


def validate(ha_python: Path, tmp: Path, messages: dict[str, bytes], prefix: str = "homeassistant") -> dict:
    inp = tmp / f"ha-{uuid.uuid4().hex[:6]}.json"
    inp.write_text(json.dumps({"discovery_prefix": prefix,
                               "messages": {t: p.decode("utf-8", "replace") for t, p in messages.items()}}))
    r = subprocess.run([str(ha_python), str(ROOT / "tools" / "ha_validate.py"), str(inp)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


class Watcher:
    """An MQTT client that records every message on its filters (retained ones included)."""

    def __init__(self, broker: Broker, filters: list[str]) -> None:
        self.cv = threading.Condition()
        self.last: dict[str, bytes] = {}
        self.log: list[tuple[str, bytes, bool]] = []
        self.marker = f"test/marker/{uuid.uuid4().hex[:8]}"
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="w-" + uuid.uuid4().hex[:8],
                             protocol=mqtt.MQTTv5)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        for f in [*filters, self.marker]:
            self.c.subscribe(f, qos=1)
        # Mosquitto sends the retained messages of a SUBSCRIBE before it handles our next PUBLISH:
        # once the marker is back, everything retained has arrived
        self.c.publish(self.marker, b"x", qos=1)
        self.wait(lambda: self.marker in self.last, "the marker")

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        with self.cv:
            self.last[msg.topic] = msg.payload
            self.log.append((msg.topic, msg.payload, bool(msg.retain)))
            self.cv.notify_all()

    def wait(self, cond: Any, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        with self.cv:
            while not cond():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what} within {timeout} s; seen: {sorted(self.last)}")
                self.cv.wait(left)

    def retained(self) -> dict[str, bytes]:
        """What is retained now (empty payloads dropped), without the marker."""
        with self.cv:
            return {t: p for t, p in self.last.items() if p and t != self.marker}

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def snapshot(broker: Broker, filters: list[str]) -> dict[str, bytes]:
    w = Watcher(broker, filters)
    try:
        return w.retained()
    finally:
        w.close()


def ha_cfg(streams: list[str], enabled: bool = True) -> dict[str, Any]:
    return {"homeassistant": {"enabled": enabled, "streams": streams}}


def configs(msgs: dict[str, bytes], node: str) -> dict[str, dict]:
    return {t.split("/")[3]: json.loads(p) for t, p in msgs.items()
            if t.startswith(f"homeassistant/sensor/{node}/") and t.endswith("/config") and p}


def send(client: mqtt.Client, prefix: str, stream: str, frame_id: str, payload: bytes = SAMPLE,
         response_topic: str | None = None) -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = [("frame_id", frame_id)]
    if response_topic:
        props.ResponseTopic = response_topic
    client.publish(f"{prefix}/in/{stream}", payload, qos=1, properties=props)


# ---- live: a daemon on a real broker, validated by Home Assistant's code ---------------------------------

def test_discovery_accepted_by_home_assistant_and_entities_show_the_daemon(daemon_factory, broker, tmp_path,
                                                                           ha_python):
    d = daemon_factory(ha_cfg(["cam1", "cam.back"]))
    node = node_id(config.load(d.cfg_path))
    w = Watcher(broker, ["homeassistant/#", f"{d.prefix}/#"])
    try:
        w.wait(lambda: len(configs(w.retained(), node)) == 8, "8 discovery configs")
        for i in range(3):
            send(w.c, d.prefix, "cam1", f"f{i}")
        w.wait(lambda: b'"frame_id": "f' in w.last.get(f"{d.prefix}/ha/label/cam1", b""), "a label of cam1")
        w.wait(lambda: json.loads(w.last.get(f"{d.prefix}/ha/state") or b"{}").get("p99_ms", 0) > 0,
               "the daemon's figures after the frames")
        live = w.retained()
    finally:
        w.close()
    # a subscriber arriving now (as Home Assistant after a restart) sees the same, retained
    seen = snapshot(broker, ["homeassistant/#", f"{d.prefix}/#"])
    assert configs(seen, node) == configs(live, node)
    assert not [t for t in seen if t.startswith("homeassistant/") and not t.endswith("/config")], seen.keys()

    res = validate(ha_python, tmp_path, seen)
    assert res["version"] == "2024.3.3"
    ents = {t.split("/")[3]: e for t, e in res["entities"].items()}
    assert set(ents) == DAEMON_KEYS | {"label_cam1", object_id("label_cam.back")}, ents.keys()
    bad = {k: e["errors"] for k, e in ents.items() if not e["ok"]}
    assert not bad, bad
    dev = {json.dumps(e["device"], sort_keys=True) for e in ents.values()}
    assert len(dev) == 1, "every entity on one device"
    device = ents["state"]["device"]
    assert device["identifiers"] == [f"edged_{d.device_id}"] and device["model"] == "edged"
    assert device["name"] == f"edged {d.device_id}" and device["sw_version"]
    assert all(e["config"]["unique_id"].startswith(f"edged_{d.device_id}_") for e in ents.values())
    assert len({e["config"]["unique_id"] for e in ents.values()}) == len(ents)

    assert ents["state"]["state"] == "online" and ents["state"]["available"] is True
    assert ents["accelerator"]["state"] == "cpu" and set(ents["accelerator"]["attributes"]) == {"reason", "skipped"}
    assert float(ents["fps"]["state"]) >= 0 and float(ents["latency_p99"]["state"]) > 0
    assert float(ents["errors"]["state"]) == 0 and 0 <= float(ents["pool"]["state"]) <= 100
    assert ents["pool"]["attributes"]["capacity_bytes"] > 0
    label = ents["label_cam1"]
    assert label["state"] == "7" and label["available"] is True, label  # the bundled sample is a 7
    assert label["attributes"]["score"] > 0.9 and label["attributes"]["frame_id"] in ("f0", "f1", "f2")
    assert label["attributes"]["class_id"] == 7 and label["attributes"]["model"] == "digits"
    assert ents[object_id("label_cam.back")]["state"] is None  # no frame yet: unknown in Home Assistant

    # a clean stop: the entities stay, unavailable; the state sensor says stopped
    assert d.stop() == 0
    res = validate(ha_python, tmp_path, snapshot(broker, ["homeassistant/#", f"{d.prefix}/#"]))
    ents = {t.split("/")[3]: e for t, e in res["entities"].items()}
    assert ents["state"]["state"] == "stopped"
    assert {k: e["available"] for k, e in ents.items() if k != "state"} == {k: False for k in ents if k != "state"}


def test_real_home_assistant_sets_up_the_entities_and_follows_reload_and_stop(daemon_factory, broker, tmp_path,
                                                                               ha_python):
    """Home Assistant 2024.3.3 itself (its MQTT integration, its client, its entity code: tools/ha_consumer.py)
    on the same broker: the entities appear on one device with the states edged publishes, a stream taken off
    the list on SIGHUP disappears, and a clean stop leaves the state 'stopped' and the rest unavailable."""
    d = daemon_factory(ha_cfg(["cam1", "cam2"]), device_id="ha-real")
    w = Watcher(broker, [f"{d.prefix}/ha/#"])
    try:
        send(w.c, d.prefix, "cam1", "r1")
        w.wait(lambda: b'"r1"' in w.last.get(f"{d.prefix}/ha/label/cam1", b""), "cam1's label")
    finally:
        w.close()
    e = "sensor.edged_ha_real_"
    ready = tmp_path / "ha-ready"
    proc = subprocess.Popen([str(ha_python), str(ROOT / "tools" / "ha_consumer.py"), str(broker.port),
                             str(free_port()), "edged_ha-real_", "90", f"{e}label_cam1=7", f"{e}state=online",
                             f"{e}accelerator=cpu", "--then", str(ready), f"{e}label_cam2=absent",
                             f"{e}state=stopped", f"{e}fps=unavailable", f"{e}label_cam1=unavailable"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "Home Assistant did not get the entities in time"
            time.sleep(0.1)
        d.config["homeassistant"]["streams"] = ["cam1"]
        d.cfg_path.write_text(yaml.safe_dump(d.config))
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reload: now serving" not in d.log():
            assert time.monotonic() < deadline, d.log()[-2000:]
            time.sleep(0.1)
        assert d.stop() == 0
        out, err = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    res = json.loads(out)
    assert res["version"] == "2024.3.3"
    assert res["waited_for"] == {f"{e}label_cam1": "7", f"{e}state": "online", f"{e}accelerator": "cpu"}, res
    keys = {f"{e}{k}" for k in DAEMON_KEYS | {"label_cam1", "label_cam2"}}
    assert set(res["states"]) == keys and set(res["registry"]) == keys
    assert {r["unique_id"] for r in res["registry"].values()} == {k.replace(e, "edged_ha-real_") for k in keys}
    assert len({r["device_id"] for r in res["registry"].values()}) == 1
    assert res["devices"] == [{"identifiers": [["mqtt", "edged_ha-real"]], "name": "edged ha-real", "model": "edged",
                               "manufacturer": "edged", "sw_version": res["devices"][0]["sw_version"]}]
    st = res["states"]
    assert st[f"{e}label_cam1"]["attributes"]["frame_id"] == "r1" and st[f"{e}label_cam1"]["attributes"]["score"] > 0.9
    assert st[f"{e}label_cam2"]["state"] == "unknown"
    assert float(st[f"{e}latency_p99"]["state"]) > 0 and st[f"{e}latency_p99"]["attributes"]["unit_of_measurement"] == "ms"
    assert float(st[f"{e}pool"]["state"]) >= 0 and float(st[f"{e}errors"]["state"]) == 0
    assert float(st[f"{e}fps"]["state"]) >= 0
    assert res["registry"][f"{e}pool"]["entity_category"] == "diagnostic"
    then = res["then"]
    assert then["waited_for"] == {f"{e}label_cam2": "absent", f"{e}state": "stopped", f"{e}fps": "unavailable",
                                  f"{e}label_cam1": "unavailable"}, then["waited_for"]
    assert f"{e}label_cam2" not in then["registry"], "a stream taken off the list leaves no entity"
    # Home Assistant logged no warning or error about edged's messages (templates, JSON, schema)
    ours = [r for r in res["errors"] if "mqtt" in r or "edged" in r or "template" in r]
    assert not ours, ours


def test_validator_rejects_what_home_assistant_would_not_take(ha_python, tmp_path):
    """The check is not vacuous: Home Assistant's schema refuses these, and the validator says so."""
    cfg = config.parse("device_id: v1\nhomeassistant: {enabled: true}\n")
    good = HomeAssistant(cfg, lambda *a: True).entities()
    topic, payload = next(iter(sorted(good.items())))
    cases = {
        "homeassistant/sensor/edged_v1/a/config": {**payload, "state_class": "sometimes"},
        "homeassistant/sensor/edged_v1/b/config": {**payload, "options": ["a", "b"]},  # not an MQTT sensor key
        "homeassistant/sensor/edged_v1/c/config": {**payload, "device": {"name": "no identifiers"}},
        "homeassistant/sensor/edged_v1/d.e/config": payload,  # a topic level HA refuses
        "homeassistant/sensor/edged_v1/f/config": {**payload, "state_topic": "a/+/#/b"},
    }
    res = validate(ha_python, tmp_path, {t: json.dumps(p).encode() for t, p in cases.items()})
    assert {t: e["ok"] for t, e in res["entities"].items()} == {t: False for t in cases}
    assert "options" in res["entities"]["homeassistant/sensor/edged_v1/b/config"]["errors"][0]
    ok = validate(ha_python, tmp_path, {topic: json.dumps(payload).encode()})
    assert ok["entities"][topic]["ok"], ok


def test_unique_ids_stable_and_dropped_streams_removed_on_reload_and_restart(daemon_factory, broker, tmp_path):
    d = daemon_factory(ha_cfg(["cam1", "cam2"]), device_id="ha-stable")
    node = node_id(config.load(d.cfg_path))
    w = Watcher(broker, ["homeassistant/#", f"{d.prefix}/ha/#"])
    try:
        w.wait(lambda: len(configs(w.retained(), node)) == 8, "8 configs")
        send(w.c, d.prefix, "cam2", "g1")
        w.wait(lambda: f"{d.prefix}/ha/label/cam2" in w.retained(), "cam2's label")
        first = configs(w.retained(), node)

        # SIGHUP with cam2 gone from the list: its config and its retained label are emptied
        d.config["homeassistant"]["streams"] = ["cam1"]
        d.cfg_path.write_text(yaml.safe_dump(d.config))
        assert d.proc is not None
        d.proc.send_signal(signal.SIGHUP)
        cam2 = f"homeassistant/sensor/{node}/label_cam2/config"
        w.wait(lambda: w.last.get(cam2) == b"" and w.last.get(f"{d.prefix}/ha/label/cam2") == b"",
               "the removal of cam2")
    finally:
        w.close()
    assert d.stop() == 0

    # a restart with cam2 back in the list: the same unique ids as before
    d.config["homeassistant"]["streams"] = ["cam1", "cam2"]
    d.cfg_path.write_text(yaml.safe_dump(d.config))
    d.start()
    w = Watcher(broker, ["homeassistant/#"])
    try:
        w.wait(lambda: len(configs(w.retained(), node)) == 8, "8 configs after the restart")
        again = configs(w.retained(), node)
    finally:
        w.close()
    assert {k: c["unique_id"] for k, c in again.items()} == {k: c["unique_id"] for k, c in first.items()}
    assert again == first
    assert d.stop() == 0

    # stopped with cam2 still announced, restarted without it: the stale retained config is found and emptied
    d.config["homeassistant"]["streams"] = ["cam1"]
    d.cfg_path.write_text(yaml.safe_dump(d.config))
    d.start()
    w = Watcher(broker, ["homeassistant/#"])
    try:
        w.wait(lambda: set(configs(w.retained(), node)) == DAEMON_KEYS | {"label_cam1"}, "cam2 removed at start")
    finally:
        w.close()
    assert d.stop() == 0

    # turned off: every entity of this device goes, not only what this run would have announced
    d.config["homeassistant"]["enabled"] = False
    d.cfg_path.write_text(yaml.safe_dump(d.config))
    d.start()
    w = Watcher(broker, ["homeassistant/#", f"{d.prefix}/ha/#"])
    try:
        w.wait(lambda: not configs(w.retained(), node) and not w.retained().get(f"{d.prefix}/ha/state"),
               "every config and the state removed")
    finally:
        w.close()


def test_birth_message_and_broker_restart_republish(daemon_factory, broker, tmp_path):
    d = daemon_factory(ha_cfg(["cam1"]))
    node = node_id(config.load(d.cfg_path))
    w = Watcher(broker, ["homeassistant/#"])
    try:
        w.wait(lambda: len(configs(w.retained(), node)) == 7, "7 configs")
        before = len(w.log)
        st = d.status()
        assert st is not None
        received = st["frames"]["received"]
        # garbage first: not "online", not JSON under our node; then Home Assistant's birth message
        w.c.publish("homeassistant/status", b"offline", qos=0)
        w.c.publish("homeassistant/status", b"\xff" * 5000, qos=1)
        w.c.publish("homeassistant/status", b"online", qos=0)
        w.wait(lambda: sum(1 for t, p, r in w.log[before:] if t.endswith("/config") and p) >= 7,
               "the configs again after the birth message")
        st = d.status()
        assert st is not None and st["frames"]["received"] == received, "a birth message is not a frame"
        assert st["state"] == "online"
    finally:
        w.close()

    # a broker restart without persistence forgets every retained message: edged announces again
    broker.stop()
    broker.start()
    d.wait_state("online", 60)
    w = Watcher(broker, ["homeassistant/#"])
    try:
        w.wait(lambda: len(configs(w.retained(), node)) == 7, "7 configs after the broker restart", 60)
    finally:
        w.close()


def test_results_never_go_to_the_discovery_prefix_and_strangers_cost_nothing(daemon_factory, broker, tmp_path,
                                                                             client_factory):
    d = daemon_factory(ha_cfg(["cam1"]))
    node = node_id(config.load(d.cfg_path))
    c = client_factory(d.prefix)
    w = Watcher(broker, ["homeassistant/#"])
    try:
        w.wait(lambda: len(configs(w.retained(), node)) == 7, "7 configs")
        # a stranger's config under our node id is removed; one under another node is left alone
        w.c.publish(f"homeassistant/sensor/{node}/intruder/config", b'{"state_topic": "x"}', qos=1, retain=True)
        w.c.publish("homeassistant/sensor/someone_else/x/config", b'{"state_topic": "x"}', qos=1, retain=True)
        w.wait(lambda: w.last.get(f"homeassistant/sensor/{node}/intruder/config") == b"", "the intruder emptied")
        for i, rt in enumerate(["homeassistant/sensor/x/config", "homeassistant", f"{d.prefix}/ha/state"]):
            send(c.c, d.prefix, "cam1", f"rt{i}", response_topic=rt)
        got = c.wait([f"rt{i}" for i in range(3)], 20)
        for fid, res in got.items():
            assert res is not None and res["error"]["code"] == "bad_request", (fid, res)
            assert res["_topic"] == f"{d.prefix}/out/cam1"
        c.c.publish("homeassistant/status", b"online", qos=0)
        send(c.c, d.prefix, "cam1", "after")
        assert c.wait(["after"], 20)["after"]["classes"][0]["label"] == "7"
    finally:
        w.close()
    seen = snapshot(broker, ["homeassistant/#"])
    assert b'"frame_id"' not in b"".join(seen.values()), "a result under the discovery prefix"
    assert seen["homeassistant/sensor/someone_else/x/config"] == b'{"state_topic": "x"}'
    assert d.status()["state"] == "online"


# ---- the module alone (its publish callable records) -------------------------------------------------------

def recorder(cfg_text: str) -> tuple[HomeAssistant, list[tuple[str, bytes, int, bool]]]:
    sent: list[tuple[str, bytes, int, bool]] = []
    ha = HomeAssistant(config.parse(cfg_text), lambda t, p, q, r: sent.append((t, p, q, r)) or True)
    return ha, sent


def result(stream: str, label: str, score: float, fid: str) -> dict:
    return {"stream": stream, "frame_id": fid, "model": "m", "ts": 1.0,
            "classes": [{"id": 1, "label": label, "score": score}]}


def test_labels_change_at_once_same_label_at_most_once_a_second():
    ha, sent = recorder("device_id: r\nhomeassistant: {enabled: true, streams: [a]}\n")
    labels = lambda: [json.loads(p) for t, p, q, r in sent if t == "edged/r/ha/label/a"]  # noqa: E731
    ha.on_result(result("a", "cat", 0.9, "1"))
    ha.on_result(result("a", "cat", 0.8, "2"))  # same label within a second: held back
    ha.on_result(result("a", "dog", 0.7, "3"))  # a new label: at once
    ha.on_result(result("b", "cat", 0.9, "4"))  # not listed: nothing
    ha.on_result(result("a", "dog", 0.6, "5"))
    assert [(x["label"], x["frame_id"]) for x in labels()] == [("cat", "1"), ("dog", "3")]
    ha.poll(time.monotonic())  # within the second: still held
    assert len(labels()) == 2
    ha.poll(time.monotonic() + 1.5)  # the newest held result goes out
    assert [(x["label"], x["frame_id"], x["score"]) for x in labels()][-1] == ("dog", "5", 0.6)
    ha.poll(time.monotonic() + 3)
    assert len(labels()) == 3 and all(r for t, p, q, r in sent), "label states are retained"


def test_detect_takes_the_most_confident_detection_and_none_when_empty():
    ha, sent = recorder("device_id: r\nmodel: {task: detect}\nhomeassistant: {enabled: true, streams: [a, b]}\n")
    ha.on_result({"stream": "a", "frame_id": "1", "detections": [
        {"id": 1, "label": "cat", "score": 0.6, "box": [0, 0, 1, 1]},
        {"id": 2, "label": "person", "score": 0.9, "box": [0, 0, 1, 1]}]})
    ha.on_result({"stream": "b", "frame_id": "2", "detections": []})
    ha.on_result({"stream": "a", "frame_id": "3", "error": {"code": "bad_payload", "message": "x"}})
    got = {t: json.loads(p) for t, p, q, r in sent}
    assert got["edged/r/ha/label/a"]["label"] == "person" and got["edged/r/ha/label/a"]["frame_id"] == "1"
    assert got["edged/r/ha/label/b"]["label"] == "none"


def test_birth_floods_cost_one_announcement_per_interval():
    ha, sent = recorder("device_id: r\nhomeassistant: {enabled: true}\n")
    for _ in range(100):
        ha.on_message("homeassistant/status", b"online", False)
    n = sum(1 for t, *_ in sent if t.endswith("/config"))
    assert n == 6, n
    ha.poll(time.monotonic() + 10)
    assert sum(1 for t, *_ in sent if t.endswith("/config")) == 12


def test_disabled_announces_nothing_and_removes_what_it_finds():
    ha, sent = recorder("device_id: r\n")
    ha.on_connect()
    ha.on_stats({"state": "online"})
    ha.on_result(result("a", "cat", 0.9, "1"))
    assert sent == []
    ha.on_message(f"homeassistant/sensor/{ha.node}/fps/config",
                  json.dumps({"state_topic": "edged/r/ha/state"}).encode(), True)
    ha.on_message(f"homeassistant/sensor/{ha.node}/state/config",
                  json.dumps({"state_topic": "edged/r/status"}).encode(), True)
    assert [(t, p) for t, p, q, r in sent] == [(f"homeassistant/sensor/{ha.node}/fps/config", b""),
                                              ("edged/r/ha/state", b""),
                                              (f"homeassistant/sensor/{ha.node}/state/config", b"")]
    assert all(r for *_, r in sent), "removals are retained empty messages"


def test_object_ids_are_valid_topic_levels_and_distinct():
    ids = {object_id(s) for s in ("cam.1", "cam_1", "cam 1", "cam/1", "ü", "cam-1")}
    assert len(ids) == 6 and all(__import__("re").fullmatch(r"[a-zA-Z0-9_-]+", i) for i in ids)
    assert object_id("cam_1") == "cam_1"


@pytest.mark.parametrize("text, key", [
    ("homeassistant: {discovery_prefix: ''}", "homeassistant.discovery_prefix"),
    ("homeassistant: {discovery_prefix: 'ha/#'}", "homeassistant.discovery_prefix"),
    ("homeassistant: {discovery_prefix: 'edged/x/in'}", "homeassistant.discovery_prefix"),
    ("homeassistant: {streams: ['a/b']}", "homeassistant.streams[0]"),
    ("homeassistant: {streams: ['a', 'a']}", "homeassistant.streams"),
    ("homeassistant: {streams: ['+']}", "homeassistant.streams[0]"),
    ("homeassistant: {enabled: yes please}", "homeassistant.enabled"),
    ("homeassistant: {stream: [a]}", "homeassistant.stream"),
])
def test_bad_homeassistant_config_names_the_key(text, key):
    with pytest.raises(ConfigError) as exc:
        config.parse("device_id: x\n" + text + "\n", "edged.yaml")
    assert "edged.yaml" in str(exc.value) and key in str(exc.value), str(exc.value)
