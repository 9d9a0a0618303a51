"""The watchdog tells the truth and the main loop never blocks: a reload that hangs does not stop the pings,
heartbeats or stats; a wedged part of the daemon stops them."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import numpy as np
import yaml

from conftest import BUNDLED, shared, until
from edged.ioloop import IoLoop
from edged.watchdog import Progress
from test_ops import NotifySocket


def test_reload_that_hangs_runs_off_the_main_loop_pings_go_on_old_model_serves(daemon_factory, client_factory,
                                                                                tmp_path):
    ns = NotifySocket(tmp_path / "notify.sock")
    try:
        d = daemon_factory({"sandbox": {"heartbeat_s": 0.3, "start_timeout_s": 4}},
                           env={"NOTIFY_SOCKET": str(ns.path), "WATCHDOG_USEC": "1000000", "EDGED_TEST_HOOKS": "1"})
        c = client_factory(d.prefix)
        until(lambda: ns.seen("WATCHDOG=1"), 5, "a first watchdog ping")
        hang = tmp_path / "model-EDGED-TEST-HANG-ON-LOAD.tflite"  # its load never ends (edged.faults)
        shutil.copy(BUNDLED / "digits.tflite", hang)
        cfg = d.config
        cfg["model"] = dict(cfg["model"], path=str(hang))
        d.cfg_path.write_text(yaml.safe_dump(cfg))
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGHUP)
        until(lambda: "reload failed" in d.log(), 20, "the reload abandoned after sandbox.start_timeout_s")
        t1 = time.monotonic()
        pings = [t for t in ns.seen("WATCHDOG=1") if t0 <= t <= t1]
        gaps = [b - a for a, b in zip([t0, *pings], [*pings, t1], strict=True)]
        print(f"reload hung for {t1 - t0:.1f} s: {len(pings)} watchdog pings, longest gap {max(gaps):.2f} s "
              "(WatchdogSec here 1 s)")
        assert t1 - t0 >= 4 and max(gaps) < 1.0, gaps  # pinged every WatchdogSec/4 = 0.25 s throughout
        c.send(np.zeros((1, 8, 8, 1), np.uint8).tobytes(), "still-old")
        res = c.wait(["still-old"], 20)["still-old"]
        assert res is not None and res.get("model") == "digits", res
        assert d.status()["state"] == "online"
    finally:
        ns.close()


def test_progress_names_the_part_that_stopped_beating() -> None:
    p = Progress()
    now = time.monotonic()
    assert p.stalled(now, 5) == []
    p.beats["io loop"] = now - 10
    assert [s.split(" (")[0] for s in p.stalled(now, 5)] == ["io loop"]


def io_stalled(p: Progress) -> bool:
    return any(s.startswith("io loop") for s in p.stalled(time.monotonic(), 0.5))


def test_wedged_io_loop_stops_its_beat() -> None:
    """A callback that blocks the I/O thread: its timer-driven beat stops, which is what the watchdog reads."""
    loop, p, release = IoLoop(), Progress(), threading.Event()

    def beat() -> None:
        p.beat("io loop")
        loop.call_later(0.05, beat)

    loop.start()
    try:
        loop.call_soon(beat)
        until(lambda: time.monotonic() - p.beats["io loop"] < 0.2, 5, "the loop beating")
        loop.call_soon(release.wait, 5.0)  # wedge it
        until(lambda: io_stalled(p), 5, "the beat to stop while the loop is wedged")
        release.set()
        until(lambda: not io_stalled(p), 5, "the beat back once the loop turns again")
    finally:
        release.set()
        loop.stop()
        loop.close()


def test_restart_uses_the_config_in_memory_not_the_file(daemon_factory, client_factory):
    """An edit never reloaded must not take effect in a restarted worker; a missing file must not keep the
    slot dead (on 0.1 the restart thread died of FileNotFoundError)."""
    d = daemon_factory({"sandbox": {"backoff_max_s": 0.2}})
    c = client_factory(d.prefix)
    cfg = dict(d.config, model={"path": str(shared("mobilenet_v1_0.25_128_quant.tflite")),
                                "labels": str(shared("imagenet_labels.txt")), "task": "classify"})
    d.cfg_path.write_text(yaml.safe_dump(cfg))  # edited, never reloaded
    for round_ in range(2):
        pid = d.status()["workers"][0]["pid"]
        os.kill(pid, signal.SIGKILL)
        until(lambda pid=pid: (w := d.status()["workers"][0])["pid"] != pid and w["state"] == "ready", 20,
              "the worker restarted")
        c.send(np.zeros((1, 8, 8, 1), np.uint8).tobytes(), f"r{round_}")
        res = c.wait([f"r{round_}"], 20)[f"r{round_}"]
        assert res is not None and res.get("model") == "digits", res
        d.cfg_path.unlink(missing_ok=True)  # for the second round: the file is gone
    assert d.status()["workers"][0]["restarts"] == 2
