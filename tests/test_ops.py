"""Operations with a real `edged run`: sd_notify, watchdog, reload, drain, status CLI, stats, Prometheus."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from conftest import BUNDLED, DATA, edged_cmd, shared, until

RAW_DIGIT = np.zeros((1, 8, 8, 1), np.uint8).tobytes()


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; records every message with its time."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.path = path
        self.msgs: list[tuple[float, str]] = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except OSError:
                continue
            self.msgs.append((time.monotonic(), data.decode()))

    def seen(self, field: str, since: float = 0.0) -> list[float]:
        return [t for t, m in self.msgs if t >= since and field in m.split("\n")]

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        self.sock.close()


def test_notify_ready_watchdog_stopping_and_hung_worker_stops_pings(daemon_factory, tmp_path):
    ns = NotifySocket(tmp_path / "notify.sock")
    try:
        d = daemon_factory({"sandbox": {"heartbeat_s": 0.3, "frame_timeout_s": 30}},
                           env={"NOTIFY_SOCKET": str(ns.path), "WATCHDOG_USEC": "600000"})
        until(lambda: ns.seen("WATCHDOG=1"), 5, "a watchdog ping")
        assert ns.seen("READY=1") and ns.seen("WATCHDOG=1")
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for _, m in ns.msgs)
        os.kill(int(d.status()["workers"][0]["pid"]), signal.SIGSTOP)
        # pings (every 0.3 s while healthy) stop once the last pong ages past the health limit (2 s here):
        # wait for 2 s without one, which a daemon that kept pinging never gives
        until(lambda: time.monotonic() - max(ns.seen("WATCHDOG=1")) >= 2.0, 15,
              "2 s without a watchdog ping while the worker is hung")
        assert d.proc.poll() is None  # quiet because the worker hung, not because the daemon went away
        assert d.stop() == 0
        assert ns.seen("STOPPING=1")
    finally:
        ns.close()


def test_sighup_model_swap_mid_stream_loses_nothing_and_new_model_answers(daemon_factory, client_factory):
    d = daemon_factory()
    c = client_factory(d.prefix)
    sample = (BUNDLED / "digits_sample.png").read_bytes()
    ids = []
    for i in range(200):
        fid = f"h{i}"
        ids.append(fid)
        c.send(sample, fid)
        if i == 60:
            cfg = d.config
            cfg["model"]["path"] = str(DATA / "digits_int8io.tflite")
            import yaml

            d.cfg_path.write_text(yaml.safe_dump(cfg))
            d.proc.send_signal(signal.SIGHUP)
        time.sleep(0.01)  # pacing, not a synchronisation: the stream spans the reload
    got = c.wait(ids, 60)
    assert all(v is not None for v in got.values())
    assert not [v for v in got.values() if "error" in v], [v for v in got.values() if "error" in v][:2]
    assert all(v["classes"][0]["label"] == "7" for v in got.values())

    def new_model_answers() -> bool:
        c.send(sample, "after")
        r = c.wait(["after"], 10)["after"]
        c.results.pop("after", None)
        return bool(r and r.get("model") == "digits_int8io")

    until(new_model_answers, 20, "results from the new model", 0.2)
    assert d.status()["model"]["path"].endswith("digits_int8io.tflite")


def test_sighup_with_broken_model_keeps_serving_old(daemon_factory, client_factory):
    import yaml

    d = daemon_factory()
    c = client_factory(d.prefix)
    cfg = d.config
    cfg["model"]["path"] = str(d.dir / "missing.tflite")
    d.cfg_path.write_text(yaml.safe_dump(cfg))
    d.proc.send_signal(signal.SIGHUP)
    until(lambda: "reload failed" in d.log(), 15, "the reload refused", detail=lambda: d.log()[-1500:])
    c.send(RAW_DIGIT, "still")
    r = c.wait(["still"], 15)["still"]
    assert r and "error" not in r and r["model"] == "digits"
    assert "reload failed" in d.log() and "missing.tflite" in d.log()


def test_sigterm_with_frames_in_flight_exits_zero_and_answers_them(daemon_factory, client_factory):
    d = daemon_factory({"model": {"path": str(shared("mobilenet_v2_1.0_224_quant.tflite")),
                                  "labels": str(shared("imagenet_labels.txt")), "task": "classify"}})
    c = client_factory(d.prefix)
    x = np.zeros((1, 224, 224, 3), np.uint8).tobytes()
    ids = [f"t{i}" for i in range(30)]
    for fid in ids:
        c.send(x, fid)
    until(lambda: d.status()["frames"]["received"] >= 30, 10, "30 frames admitted", 0.02)
    taken = d.status()["frames"]["received"]
    assert d.stop(signal.SIGTERM, 30) == 0
    got = c.wait(ids, 5)
    answered = [k for k, v in got.items() if v is not None]
    assert len(answered) >= taken == 30
    assert not [v for v in got.values() if v and "error" in v]
    assert "stopping: draining" in d.log()


def test_status_cli_table_json_socket_mode_and_exit_69(daemon_factory, client_factory, tmp_path):
    d = daemon_factory()
    sock = Path(d.config["status"]["socket"])
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    r = subprocess.run(edged_cmd("status", "-c", str(d.cfg_path)), capture_output=True, text=True, env=d.env, timeout=20)
    assert r.returncode == 0 and "digits" in r.stdout and "sandboxed yes" in r.stdout
    r = subprocess.run(edged_cmd("status", "--json", "--socket", str(sock)), capture_output=True, text=True,
                       env=d.env, timeout=20)
    st = json.loads(r.stdout)
    for key in ("state", "version", "uptime_s", "model", "accelerator", "frames", "latency_ms", "queue_depth",
                "pool", "workers", "memory", "mqtt"):
        assert key in st, key
    assert st["model"]["input"] == {"shape": [1, 8, 8, 1], "dtype": "uint8"}
    r = subprocess.run(edged_cmd("status", "--socket", str(tmp_path / "none.sock")), capture_output=True, text=True,
                       env=d.env, timeout=20)
    assert r.returncode == 69 and "none.sock" in r.stderr


def test_stats_topic_and_prometheus_textfile_follow_interval(daemon_factory, client_factory, tmp_path):
    prom = tmp_path / "edged.prom"
    d = daemon_factory({"status": {"socket": str(tmp_path / "p.sock"), "interval": 0.5, "prometheus_file": str(prom)}})
    c = client_factory(d.prefix)
    stats: list[dict] = []
    c.c.message_callback_add(f"{d.prefix}/stats", lambda cl, u, m: stats.append(json.loads(m.payload)))
    c.c.subscribe(f"{d.prefix}/stats", qos=0)
    for i in range(5):
        c.send(RAW_DIGIT, f"p{i}")
    c.wait([f"p{i}" for i in range(5)], 15)
    until(lambda: len(stats) >= 2 and stats[-1]["frames"]["completed"] >= 5, 10, "two stats messages, the last "
          "after the five frames", detail=lambda: str(stats[-2:]))
    # the textfile is written beside the same stats message: once it counts the five frames, it is current
    until(lambda: prom.exists() and 'edged_frames_completed_total 5.0' in prom.read_text(), 10,
          "the textfile after the five frames", detail=lambda: prom.read_text() if prom.exists() else "absent")
    text = prom.read_text()
    assert "edged_frames_completed_total" in text and "# TYPE edged_pool_used_bytes gauge" in text
    assert 'edged_stage_latency_seconds_bucket{le="+Inf",stage="total"}' in text
