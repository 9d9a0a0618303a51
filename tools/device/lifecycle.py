"""The daemon's life under systemd while frames stream in from the host: reload, soak, watchdog, stop.

Steps of tools/device/check.py (each takes its Check); only systemctl,
journalctl, `edged status --json` and MQTT are used.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from check import Check

logger = logging.getLogger("device-check")


def stream(chk: Check, n: int, rate: float, during: Any, tag: str) -> tuple[int, int]:
    """Send n frames at rate/s, run during() once half were answered; returns (lost, errors)."""
    assert chk.mq is not None
    ids = chk.ids(n, tag)
    payloads = [chk.local(f) for f in chk.stream_files]

    def feed() -> None:
        for i, fid in enumerate(ids):
            chk.mq.send(fid, payloads[i % len(payloads)])
            time.sleep(1 / rate)
    t = threading.Thread(target=feed, daemon=True)
    t.start()
    chk.mq.wait(lambda: chk.mq.answered(ids) >= n // 3, 180, f"{tag}: first third answered")
    during()
    t.join()
    try:
        chk.mq.wait_all(ids, 240, tag)
    except TimeoutError as exc:
        logger.warning("%s", exc)
    return n - chk.mq.answered(ids), len(chk.mq.errors(ids))


def reload(chk: Check) -> None:
    lost, errs = stream(chk, 120, 20, lambda: chk.sh("systemctl reload edged", timeout=300), "reload")
    chk.fig["reload_lost"] = lost
    chk.expect(lost == 0 and errs == 0, f"systemctl reload mid-stream: {lost} lost, {errs} errors")


def soak(chk: Check) -> None:
    assert chk.mq is not None
    rest = chk.pss("pss_rest_mib")
    peak = dict(rest)
    sent = 0
    ids_all: list[str] = []
    payloads = [chk.local(f) for f in chk.stream_files]
    deadline = time.monotonic() + chk.args.soak_s
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        ids = chk.ids(chk.args.burst, "soak")
        for i, fid in enumerate(ids):
            chk.mq.send(fid, payloads[i % len(payloads)])
        ids_all += ids
        sent += len(ids)
        p = chk.guest("pss", py="python3")
        if p["daemon_kib"] + p["workers_kib"] > peak["daemon_kib"] + peak["workers_kib"]:
            peak = p
        chk.mq.wait_all(ids, 300, "soak burst")
    dur = time.monotonic() - t0
    lost, errs = sent - chk.mq.answered(ids_all), len(chk.mq.errors(ids_all))
    chk.fig["pss_load_mib"] = f"{peak['daemon_kib'] // 1024}+{peak['workers_kib'] // 1024}"
    chk.fig["soak"] = f"{round(dur)}s/{sent}fr/{round(sent / dur, 1)}fps/{lost}lost"
    after = chk.guest("pss", py="python3")
    chk.expect(lost == 0 and errs == 0, f"soak: {sent} frames in {dur:.0f} s, {lost} lost, {errs} errors")
    chk.expect(after["oom_kill"] == 0, f"soak: no OOM kill (memory.events oom_kill {after['oom_kill']})")
    rest_kib = rest["daemon_kib"] + rest["workers_kib"]
    budget = rest_kib + max(8192, rest_kib // 10)

    def back() -> bool:
        nonlocal after
        after = chk.guest("pss", py="python3")
        return after["daemon_kib"] + after["workers_kib"] <= budget
    try:
        chk.mq.wait(back, 90, "memory back at rest")
    except TimeoutError:
        pass
    chk.fig["pss_after_mib"] = f"{after['daemon_kib'] // 1024}+{after['workers_kib'] // 1024}"
    restarts = sum(w.get("restarts", 0) for w in chk.status().get("workers", []))
    chk.expect(restarts == 0, f"soak: no worker restarts ({restarts})")
    chk.expect(after["daemon_kib"] + after["workers_kib"] <= budget,
                f"soak: PSS back at rest ({chk.fig['pss_after_mib']} MiB vs {chk.fig['pss_rest_mib']} MiB)")


def watchdog(chk: Check) -> None:
    assert chk.mq is not None
    u = chk.unit("MainPID", "NRestarts", "WatchdogUSec")
    wd = int(u["WatchdogUSec"].rstrip("s") or 0) if u["WatchdogUSec"].rstrip("s").isdigit() else 30
    t_stop = float(chk.sh(f"kill -STOP {u['MainPID']} && cut -d' ' -f1 /proc/uptime"))
    ids = chk.ids(10, "watchdog")
    for i, fid in enumerate(ids):
        chk.mq.send(fid, chk.local(chk.stream_files[i % len(chk.stream_files)]))
    chk.mq.wait(lambda: chk.unit("NRestarts")["NRestarts"] != u["NRestarts"]
                 and chk.unit("ActiveState")["ActiveState"] == "active", 180, "watchdog restart")
    v = chk.unit("ActiveEnterTimestampMonotonic", "MainPID")
    fired = chk.sh("journalctl -u edged -b --no-pager -o short-monotonic | grep -i 'watchdog timeout' | tail -1")
    m = re.match(r"\[\s*([\d.]+)\]", fired)
    fire_s = float(m.group(1)) - t_stop if m else None
    ready_s = int(v["ActiveEnterTimestampMonotonic"]) / 1e6 - t_stop
    chk.fig["watchdog_s"] = f"{fire_s:.0f}/{ready_s:.0f}" if fire_s is not None else f"?/{ready_s:.0f}"
    wd_s = wd / 1e6 if wd > 1000 else wd
    chk.expect(
        fire_s is not None and fire_s <= wd_s + 5 and v["MainPID"] != u["MainPID"],
        f"kill -STOP: watchdog fired after {fire_s} s (WatchdogSec {wd_s:.0f}), READY again after {ready_s:.0f} s",
    )
    try:
        chk.mq.wait_all(ids, 180, "frames sent while stopped")
    except TimeoutError as exc:
        logger.warning("%s", exc)
    chk.expect(
        chk.mq.answered(ids) == len(ids) and not chk.mq.errors(ids),
        f"frames sent while the daemon was stopped answered after the restart ({chk.mq.answered(ids)}/{len(ids)})",
    )


def stop(chk: Check) -> None:
    assert chk.mq is not None
    ids = chk.ids(40, "stop")
    for i, fid in enumerate(ids):
        chk.mq.send(fid, chk.local(chk.stream_files[i % len(chk.stream_files)]))
    chk.mq.wait(lambda: chk.mq.answered(ids) >= 5, 120, "stop: first answers")
    chk.sh("systemctl stop edged", timeout=120)
    u = chk.unit("ExecMainStatus", "Result", "ActiveState")
    chk.mq.wait(lambda: (chk.mq.status or {}).get("state") == "stopped", 30, "see P/status stopped")
    before = chk.mq.answered(ids)
    chk.sh("systemctl start edged", timeout=300)
    chk.mq.wait_all(ids, 240, "stop: the rest after the next start")
    lost = len(ids) - chk.mq.answered(ids)
    chk.fig["stop"] = f"{before}+{len(ids) - before - lost}/{len(ids)}"
    chk.expect(u["ExecMainStatus"] == "0" and u["Result"] == "success",
                f"systemctl stop: exit status {u['ExecMainStatus']}, result {u['Result']}")
    chk.expect(lost == 0 and not chk.mq.errors(ids),
                f"systemctl stop drains: {before} answered before exit, the rest after the next start, {lost} lost")
