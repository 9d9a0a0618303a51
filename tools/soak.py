#!/usr/bin/env python3
"""Soak harness: hours of realistic mixed load on `edged run`, with faults, and a pass/fail verdict.

    .venv/bin/python tools/soak.py --hours 72            # the stability run (`make soak HOURS=72`)
    .venv/bin/python tools/soak.py --ci                  # 3 compressed minutes; exit 1 on any failed check
    .venv/bin/python tools/soak.py --ci --minutes 2 --out /tmp/s
    .venv/bin/python tools/soak.py --minutes 30 --broker 127.0.0.1:1883 --prefix edged/dev \
        --socket .run/edged.sock --pid 1234           # a daemon and broker already running
    .venv/bin/python tools/soak.py --plot soak-out/1h   # redraw soak.png from samples.csv

By default it starts its own Mosquitto (free loopback port, persistence in a temp dir,
`max_queued_messages 100000`, `set_tcp_nodelay true`) and its own `edged run` (config written
to the output dir; bundled digits model unless --model/--labels/--task). With --broker/--prefix/
--socket/--pid it drives running ones and restarts neither (no broker restarts then).

Load: streams cam1 (small JPEGs, ESP32-like), cam2 (VGA/HD JPEGs and PNGs up to 1280x960) and
cam3 (raw tensors of the model's input, small PNG/BMP), in phases: steady (~15-35 fps), bursts
(~60-100 fps for a few seconds) and idle gaps (long enough for the pool to give segments back).
5% of frames are bad (noise, truncated JPEG, PNG garbage, empty). Every frame is QoS 1 with a
unique `frame_id` user property; at most --max-outstanding frames are unanswered at a time, so a
2-core machine is busy but not saturated. Faults: SIGHUP reloads (every 5 min; CI: every 40 s),
a worker SIGKILL (every 20 min; CI: once at 45%), a broker stop + start on the same port and
persistence dir (every 30 min; CI: once at 70%). Results are collected on P/out/# by a
persistent-session client (fixed client id, clean_start off, session expiry 3600 s) that rides
out broker restarts; the sender is a persistent session too, so paho re-sends unacknowledged
frames after a restart.

Output (--out, default soak-out/<timestamp>): samples.csv (one row per --sample-s), events.csv,
soak.png (needs matplotlib: `pip install matplotlib`; skipped with a message when absent),
verdict.json, edged.yaml/edged.log/mosquitto.log when it owns them. The verdict is printed too.

Definitions (T = seconds of load actually run; "second half" = load samples with t >= T/2):
- answered: distinct frame ids with a result or an error result; lost = sent - answered, after a
  final drain wait (--drain-s). A lost frame is reported with whether the broker acknowledged it
  (PUBACK), and PUBACK failures (e.g. 0x10, no subscriber) are counted. Duplicates (QoS 1 is at
  least once: a broker restart or a worker kill can answer a frame twice) are counted, not failed.
- memory, the gated metric: private memory = RssAnon + VmSwap from /proc/PID/status (heap, glibc
  arenas, thread stacks), the smallest of three reads 30 ms apart. Not PSS: the frame pool is
  shared memfd memory (bounded by pool.max_mb, grown for bursts and large frames, given back
  after pool.idle_release_s) whose 4 MiB steps would swamp a fit, and the PSS of shared libraries
  moves whenever any other process maps them. PSS and USS (psutil memory_full_info; needs root or
  the daemon's user, else RSS is recorded in the PSS columns and the verdict says so), RSS and the
  pool's share of PSS are recorded and their slopes reported. The pool is checked on its own:
  after the rest at the end its capacity must be back at the smallest capacity seen.
- memory slope: least-squares fit of MB against hours over the second half, for the supervisor,
  and for the sum of the current workers over the second-half samples in which every worker is
  older than --worker-warmup-s (a fresh worker's heap grows by ~8 MB in its first seconds, when
  glibc's mmap threshold adapts to the first large decode: a step, not a leak). Also reported:
  the supervisor's slope through the minima of 10 time windows, and the workers' slope within a
  life (one intercept per worker set). Reloads replace the workers every --reload-s, so a leak in
  the worker shows there, or in the sum with --reload-s 0 --kill-s 0.
- fd growth, thread growth (supervisor): median of the final samples (taken after the drain
  and --quiet-s of no load and no faults, so pool segments are released and no reload or
  restart thread is alive) minus the median of the baseline samples (the first quarter of the
  second half: load samples with T/2 <= t < 5T/8). Transient fds and threads can only raise
  the baseline, so growth > 0 means something was not given back.
- p99 drift: p99 of the daemon's timing_ms.total over the successful results received in the
  last quarter of the load, divided by the same over the second quarter (the first quarter is
  warm-up). It fails only above --max-p99-drift and when the difference exceeds --p99-floor-ms.

Thresholds (flags) and why:
- --max-slope-mb-h: 2.0, --ci 60, and never below --resolve-mb (1 MB) per second half. 2 MB/h
  is 48 MB a day, more than a 512 MB device can carry for a month, and it catches a leak of
  ~20 bytes per frame at 30 frames/s. The private memory of a supervisor jitters by ~0.5 MB
  (allocator pools and arenas, a frame in flight), so a fit cannot resolve less than ~1 MB of
  change over its window: over the 36 h second half of a 72 h run that is 0.03 MB/h (2 MB/h
  governs), over the 30 min of a 1 h run exactly 2 MB/h, over 3 min of a 6 min run 20 MB/h (the
  floor governs: short runs cannot judge 2 MB/h). In CI the second half is one minute: measured
  on the 2-core machine, clean runs fit 4-23 MB/h; 60 MB/h (1 MB a minute) is that floor, and
  still catches ~0.5 KiB per frame at 30 frames/s or anything leaked per reload or reconnect.
- --max-worker-slope-mb-h: 2.0; report-only in --ci, where no worker outlives its warm-up step
  (reloads every 40 s, a kill), so a 60-second fit of the workers measures the step, not a leak.
- --max-fd-growth 0, --max-thread-growth 0: the final samples are taken at rest, so any
  positive difference is a leak (a segment, a socket, a reader thread per worker restart).
- --max-p99-drift 2.0 with --p99-floor-ms 25 for long runs; report-only in --ci, where a
  30-second quarter holds one burst or fault more or less, which moves p99 by more than 2x.
- lost frames: 0. Wrong answers (a good frame answered bad_payload, too_large or
  inference_failed; a bad frame answered without an error): 0. Every reload, kill and broker
  restart must be recovered from (new workers ready; the daemon and our clients reconnected;
  the broker saved its persistence file), and the owned daemon must exit 0 on SIGTERM.
Exit status: 0 every check passed, 1 a check failed, 2 usage, 69 target not reachable.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import csv
import ctypes
import io
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import paho.mqtt.client as mqtt
import psutil
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edged.broker import Broker
from edged.errors import UnavailableError
from edged.status import query

BUNDLED = ROOT / "edged" / "models"
EX_FAIL, EX_USAGE, EX_UNAVAILABLE = 1, 2, 69
MB = float(1 << 20)
# log-spaced latency buckets as in edged.metrics (0.05 ms .. ~100 s, 10% apart)
BOUNDS = [0.05 * 1.1**i for i in range(int(math.log(2e6) / math.log(1.1)) + 1)]
GOOD_ERRORS = {"worker_crashed", "timeout", "overloaded", "expired"}  # a fault or load, not the frame

SENT, ACKED, ANSWERED, BAD, DUP, KNOWN = 1, 2, 4, 8, 16, 32  # KNOWN: a frame whose top label is known
HEX = {bytes([c]) for c in b"0123456789abcdef"}

COLUMNS = ["t_s", "phase", "rate_fps", "sent", "acked", "answered", "outstanding", "errors", "duplicates",
           "state", "sup_mem_mb", "sup_pss_mb", "sup_rss_mb", "sup_uss_mb", "sup_pool_mb",
           "sup_fds", "sup_threads", "sup_cpu_pct", "workers_ready", "workers_mem_mb", "workers_pss_mb",
           "workers_rss_mb", "workers_cpu_pct", "worker_pids", "workers_min_age_s", "pool_capacity_mb", "pool_used_mb",
           "pool_high_water_mb", "pool_fragmentation", "pool_segments", "pool_grows", "pool_shrinks",
           "queue_depth", "status_p50_ms", "status_p99_ms", "win_p50_ms", "win_p99_ms", "win_e2e_p99_ms",
           "daemon_received", "daemon_completed", "daemon_errors", "daemon_dropped", "mqtt_connected",
           "mqtt_reconnects", "sys_cpu_pct", "events"]
# what the verdict needs, kept in memory (the full rows go to samples.csv only: 72 h is 26,000 rows)
KEEP = ("t_s", "phase", "sup_mem_mb", "sup_pss_mb", "sup_rss_mb", "workers_mem_mb", "worker_pids",
        "workers_min_age_s", "sup_fds",
        "sup_threads", "pool_capacity_mb", "status_p50_ms", "status_p99_ms", "pool_grows", "pool_shrinks")


# ---- processes we own --------------------------------------------------------------------------
def _parent_death_signal() -> Callable[[], None]:
    """preexec_fn: SIGTERM the child when we die (a killed soak must not leave a daemon behind)."""
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl

    def setup() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return setup


def own_broker(out: Path) -> Broker:
    """Mosquitto on a free loopback port, persistence in a store of its own (removed by close()), its
    config and log in OUT; restartable on the same port and store. Dies with us (parent-death signal)."""
    return Broker(out, persistence=True, autosave_s=60, name="mosquitto", preexec_fn=_parent_death_signal())


class OwnDaemon:
    """`python -m edged run -c OUT/edged.yaml` as a child process."""

    def __init__(self, out: Path, tmp: Path, broker: Broker, opts: argparse.Namespace, run_id: str) -> None:
        self.device_id = f"soak-{run_id}"
        self.prefix = f"soak/{self.device_id}"
        self.socket = str(tmp / "edged.sock")  # a short path: sun_path holds 108 bytes
        cfg = {"device_id": self.device_id,
               "mqtt": {"host": broker.host, "port": broker.port, "topic_prefix": self.prefix},
               "model": {"path": str(Path(opts.model).resolve()), "task": opts.task, "top_k": 3,
                         "labels": str(Path(opts.labels).resolve()) if opts.labels else None},
               "accelerator": {"workers": opts.workers},
               "status": {"socket": self.socket, "interval": 10},
               "logging": {"level": "INFO"}}
        for key, val in getattr(opts, "daemon_extra", {}).items():  # a profile's sections (tools/soak_site.py)
            cfg[key] = {**cfg.get(key, {}), **val} if isinstance(val, dict) else val
        self.cfg_path = out / "edged.yaml"
        self.cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.log = out / "edged.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edged", "run", "-c", str(self.cfg_path)], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_parent_death_signal())
        return self.proc.pid

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                return None
        return self.proc.returncode


# ---- frames ------------------------------------------------------------------------------------
SIZES = [(64, 64), (160, 120), (320, 240), (640, 480), (1280, 960)]
# stream -> (share of traffic, [(weight, kind)]) where kind is "fmt:WxH" or "raw"
STREAMS: dict[str, tuple[float, list[tuple[float, str]]]] = {
    "cam1": (0.45, [(5, "jpeg:64x64"), (40, "jpeg:160x120"), (40, "jpeg:320x240"), (15, "jpeg:640x480")]),
    "cam2": (0.20, [(40, "jpeg:640x480"), (30, "jpeg:1280x960"), (15, "png:320x240"), (10, "png:640x480"),
                    (5, "png:1280x960")]),
    "cam3": (0.35, [(75, "raw"), (10, "png:64x64"), (5, "bmp:64x64"), (5, "bmp:160x120"), (5, "png:160x120")]),
}
CTYPES = {"jpeg": "image/jpeg", "png": "image/png", "bmp": "image/bmp", "raw": "application/octet-stream"}


def _picture(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A camera-like picture: gradients, a few solid objects, sensor noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0.2, 1.0, 3)
    img = np.stack([xx / w * 255 * a[0], yy / h * 255 * a[1], (xx + yy) / (w + h) * 255 * a[2]], axis=-1)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w - 4)), int(rng.integers(0, h - 4))
        x1, y1 = x0 + int(rng.integers(4, max(5, w // 3))), y0 + int(rng.integers(4, max(5, h // 3)))
        img[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


class FrameSet:
    """Payloads made once at start: encoded images of five sizes, raw tensors, and bad frames."""

    def __init__(self, seed: int, input_shape: list[int], input_dtype: str, bad_share: float) -> None:
        rng = np.random.default_rng(seed)
        self.rng = random.Random(seed)
        self.bad_share = bad_share
        self.images: dict[str, list[bytes]] = {}
        for w, h in SIZES:
            pics = [_picture(rng, w, h) for _ in range(3)]
            for fmt in ("jpeg", "png", "bmp"):
                if fmt == "bmp" and w > 160:
                    continue
                blobs = []
                for p in pics:
                    buf = io.BytesIO()
                    p.save(buf, fmt.upper(), **({"quality": int(rng.integers(70, 95))} if fmt == "jpeg" else {}))
                    blobs.append(buf.getvalue())
                self.images[f"{fmt}:{w}x{h}"] = blobs
        self.raw_bytes = int(np.prod(input_shape)) * np.dtype(input_dtype).itemsize
        self.raws = [rng.integers(0, 256, self.raw_bytes, dtype=np.uint8).tobytes() for _ in range(8)]
        self.noise = rng.integers(0, 256, 60000, dtype=np.uint8).tobytes()

    def sizes(self) -> dict[str, int]:
        return {k: max(len(b) for b in v) for k, v in self.images.items()}

    def pick(self, stream: str) -> tuple[bytes, bool, str | None]:
        """(payload, is_bad, content_type) for the next frame of a stream."""
        r = self.rng
        if r.random() < self.bad_share:
            return self._bad(), True, None
        mix = STREAMS[stream][1]
        kind = r.choices([k for _, k in mix], weights=[w for w, _ in mix])[0]
        if kind == "raw":
            return r.choice(self.raws), False, CTYPES["raw"] if r.random() < 0.3 else None
        return r.choice(self.images[kind]), False, CTYPES[kind.split(":")[0]] if r.random() < 0.3 else None

    def _bad(self) -> bytes:
        r = self.rng
        kind = r.choice(["noise", "noise", "trunc_jpeg", "trunc_jpeg", "png_garbage", "empty"])
        if kind == "noise":
            n = r.randint(100, 50000)
            if n == self.raw_bytes:  # a payload of exactly the input size is a valid raw tensor
                n += 1
            start = r.randint(0, len(self.noise) - n)
            blob = self.noise[start:start + n]
            return b"\x00" + blob[1:] if blob[:2] in (b"\xff\xd8", b"\x89P", b"BM") else blob
        if kind == "trunc_jpeg":
            jpg = r.choice(self.images[f"jpeg:{r.choice(['320x240', '640x480', '1280x960'])}"])
            return jpg[: int(len(jpg) * r.uniform(0.1, 0.7))]
        if kind == "png_garbage":
            n = r.randint(200, 20000)
            return b"\x89PNG\r\n\x1a\n" + self.noise[:n]
        return b""


# ---- bookkeeping -------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def hist_percentile(counts: collections.Counter[int], q: float) -> float:
    n = sum(counts.values())
    if not n:
        return float("nan")
    rank, seen = max(1, math.ceil(q / 100 * n)), 0
    for i in sorted(counts):
        seen += counts[i]
        if seen >= rank:
            return round(BOUNDS[min(i, len(BOUNDS) - 1)], 3)
    return round(BOUNDS[-1], 3)


class Ledger:
    """Per-frame state in one byte (sent/acked/answered/bad/dup), outstanding frames, error counts and
    latency histograms per time slot: constant memory per hour, small enough for 72 hours."""

    def __init__(self, run_id: str, slot_s: float) -> None:
        self.run_id = run_id
        self.cond = threading.Condition()
        self.flags = bytearray()
        self.outstanding: dict[int, tuple[float, str]] = {}  # seq -> (monotonic send time, stream)
        self.t0 = time.monotonic()
        self.slot_s = slot_s
        self.slots: dict[int, collections.Counter[int]] = collections.defaultdict(collections.Counter)
        self.win_total: list[float] = []
        self.win_e2e: list[float] = []
        self.mid_seq: dict[int, int] = {}
        self.early_acks: dict[int, int] = {}
        self.sent = self.acked = self.answered = self.duplicates = self.unexpected = self.errors = 0
        self.bad_sent = 0
        self.codes: collections.Counter[str] = collections.Counter()
        self.bad_codes: collections.Counter[str] = collections.Counter()
        self.wrong: collections.Counter[str] = collections.Counter()
        self.puback_failures: collections.Counter[str] = collections.Counter()
        self.wrong_examples: list[dict[str, Any]] = []
        self.known_label: str | None = None  # the top label of every frame sent with known=True
        self.aside_until = 0.0  # results before this monotonic time stay out of the p99 slots (a burst, a fault)
        self.aside = 0
        self.slots_all: dict[int, collections.Counter[int]] = collections.defaultdict(collections.Counter)
        self.service_latency = False  # the slots hold total - queue (dispatch to reply), not total
        self.known_ok = 0

    def frame_id(self, seq: int) -> str:
        return f"{self.run_id}-{seq}"

    def new_frame(self, stream: str, bad: bool, known: bool = False) -> int:
        with self.cond:
            seq = len(self.flags)
            self.flags.append(SENT | (BAD if bad else 0) | (KNOWN if known else 0))
            self.outstanding[seq] = (time.monotonic(), stream)
            self.sent += 1
            self.bad_sent += bad
            return seq

    def published(self, seq: int, mid: int) -> None:
        """After publish() returned: its PUBACK may already have arrived (paho's thread)."""
        with self.cond:
            rc = self.early_acks.pop(mid, None)
            if rc is None:
                self.mid_seq[mid] = seq
            else:
                self._acked(seq, rc)

    def puback(self, mid: int, rc: int) -> None:
        with self.cond:
            seq = self.mid_seq.pop(mid, None)
            if seq is None:
                self.early_acks[mid] = rc
            else:
                self._acked(seq, rc)

    def _acked(self, seq: int, rc: int) -> None:
        if rc >= 0x80 or rc == 0x10:  # 0x10: no matching subscribers, nobody will answer it
            self.puback_failures[f"0x{rc:02x}"] += 1
            return
        if not self.flags[seq] & ACKED:
            self.flags[seq] |= ACKED
            self.acked += 1

    def result(self, body: dict[str, Any]) -> None:
        fid = str(body.get("frame_id", ""))
        run, _, tail = fid.rpartition("-")
        now = time.monotonic()
        with self.cond:
            if run != self.run_id or not tail.isdigit() or int(tail) >= len(self.flags):
                self.unexpected += 1
                return
            seq = int(tail)
            f = self.flags[seq]
            if f & ANSWERED:
                self.duplicates += 1
                self.flags[seq] |= DUP
                return
            self.flags[seq] = f | ANSWERED
            self.answered += 1
            t_sent, _ = self.outstanding.pop(seq, (now, ""))
            err = body.get("error")
            if isinstance(err, dict):
                code = str(err.get("code"))
                self.errors += 1
                (self.bad_codes if f & BAD else self.codes)[code] += 1
                if not f & BAD and code not in GOOD_ERRORS:
                    self._wrong(f"good frame answered {code}", fid, body)
            elif f & BAD:
                self._wrong("bad frame answered without an error", fid, body)
            elif f & KNOWN and _top_label(body) != self.known_label:
                self._wrong(f"known frame answered {_top_label(body)!r}, not {self.known_label!r}", fid, body)
            else:
                self.known_ok += bool(f & KNOWN)
                timing = body.get("timing_ms", {})
                total = float(timing.get("total", 0.0))
                slot = int((now - self.t0) // self.slot_s)
                self.slots_all[slot][bisect.bisect_left(BOUNDS, total)] += 1
                if now < self.aside_until:
                    self.aside += 1
                else:
                    gated = total - float(timing.get("queue", 0.0)) if self.service_latency else total
                    self.slots[slot][bisect.bisect_left(BOUNDS, gated)] += 1
                self.win_total.append(total)
                self.win_e2e.append((now - t_sent) * 1e3)
            self.cond.notify_all()

    def _wrong(self, what: str, fid: str, body: dict[str, Any]) -> None:
        self.wrong[what] += 1
        if len(self.wrong_examples) < 20:
            self.wrong_examples.append({"frame_id": fid, "what": what, "result": body})

    def wait_below(self, limit: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.outstanding) < limit, timeout)

    def window(self) -> dict[str, Any]:
        """Counters now, and the latencies since the previous call."""
        with self.cond:
            tot, e2e = self.win_total, self.win_e2e
            self.win_total, self.win_e2e = [], []
            return {"sent": self.sent, "acked": self.acked, "answered": self.answered,
                    "outstanding": len(self.outstanding), "errors": self.errors, "duplicates": self.duplicates,
                    "win_p50_ms": percentile(tot, 50), "win_p99_ms": percentile(tot, 99),
                    "win_e2e_p99_ms": percentile(e2e, 99)}

    def p99_between(self, a: float, b: float, everything: bool = False) -> tuple[float, int]:
        """p99 of successful results received between a and b seconds after t0, and their count (but those
        left aside, unless everything)."""
        merged: collections.Counter[int] = collections.Counter()
        with self.cond:
            for k, c in (self.slots_all if everything else self.slots).items():
                if a <= k * self.slot_s < b:
                    merged.update(c)
        return hist_percentile(merged, 99), sum(merged.values())

    def lost(self, limit: int = 20) -> tuple[int, int, list[dict[str, Any]]]:
        """(lost and acknowledged by the broker, lost and never acknowledged, examples)."""
        with self.cond:
            items = sorted(self.outstanding.items())
            acked = sum(1 for seq, _ in items if self.flags[seq] & ACKED)
            ex = [{"frame_id": self.frame_id(seq), "stream": stream, "sent_at_s": round(t - self.t0, 3),
                   "acked_by_broker": bool(self.flags[seq] & ACKED), "bad_frame": bool(self.flags[seq] & BAD)}
                  for seq, (t, stream) in items[:limit]]
            return acked, len(items) - acked, ex


def _top_label(body: dict[str, Any]) -> str | None:
    classes = body.get("classes")
    if isinstance(classes, list) and classes and isinstance(classes[0], dict):
        return str(classes[0].get("label"))
    return None


# ---- MQTT side ---------------------------------------------------------------------------------
class Mqtt:
    """Two persistent-session MQTT v5 clients: `src` publishes frames, `sink` collects P/out/#."""

    def __init__(self, host: str, port: int, prefix: str, run_id: str, ledger: Ledger) -> None:
        self.host, self.port, self.prefix, self.ledger = host, port, prefix, ledger
        self.subscribed = threading.Event()
        self.src = self._client(f"edged-soak-{run_id}-src")
        self.src.max_inflight_messages_set(20)  # Mosquitto's default receive maximum
        self.src.on_publish = lambda c, u, mid, rc, props: ledger.puback(mid, rc.value)
        self.sink = self._client(f"edged-soak-{run_id}-sink")
        self.sink.on_message = self._on_message
        self.sink.on_subscribe = lambda *a: self.subscribed.set()
        self.connected = {id(self.src): False, id(self.sink): False}

    def _client(self, client_id: str) -> mqtt.Client:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        c.reconnect_delay_set(1, 2)
        c.on_connect = self._on_connect
        c.on_disconnect = lambda cl, u, f, rc, p: self.connected.__setitem__(id(cl), False)
        return c

    def _on_connect(self, c: mqtt.Client, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            return
        with contextlib.suppress(OSError, AttributeError):
            c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connected[id(c)] = True
        if c is self.sink:
            c.subscribe(f"{self.prefix}/out/#", qos=1)

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            body = {"frame_id": None}
        self.ledger.result(body if isinstance(body, dict) else {"frame_id": None})

    def start(self) -> None:
        for c in (self.sink, self.src):
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            c.connect_async(self.host, self.port, keepalive=20, clean_start=False, properties=props)
            c.loop_start()
        if not self.subscribed.wait(20):
            raise UnavailableError(f"broker {self.host}:{self.port} did not confirm our subscription in 20 s")

    @property
    def up(self) -> bool:
        return all(self.connected.values())

    def send(self, stream: str, payload: bytes, frame_id: str, content_type: str | None,
             extra: Callable[[Properties], None] | None = None) -> int:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("frame_id", frame_id)]
        if content_type:
            props.ContentType = content_type
        if extra is not None:  # a profile's hostile properties (tools/soak_site.py)
            extra(props)
        return int(self.src.publish(f"{self.prefix}/in/{stream}", payload, qos=1, properties=props).mid)

    def close(self) -> None:
        """Disconnect with session expiry 0: the broker forgets our sessions."""
        for c in (self.src, self.sink):
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            with contextlib.suppress(Exception):
                c.disconnect(properties=props)
            c.loop_stop()


# ---- schedule ----------------------------------------------------------------------------------
@dataclass
class Phase:
    kind: str
    start: float
    end: float
    rate: float


def phases(rng: random.Random, ci: bool) -> Any:
    """An endless sequence of load phases: steady, burst, idle."""
    if ci:
        spec = {"steady": ((6, 15), (25, 45)), "burst": ((2, 4), (80, 110)), "idle": ((3, 12), (0, 0))}
    else:
        spec = {"steady": ((30, 120), (15, 35)), "burst": ((3, 10), (60, 100)), "idle": ((5, 40), (0, 0))}
    nxt = {"steady": (["burst", "idle", "steady"], [5, 3, 2]), "burst": (["steady", "idle"], [7, 3]),
           "idle": (["steady", "burst"], [8, 2])}
    t, kind = 0.0, "steady"
    while True:
        (d0, d1), (r0, r1) = spec[kind]
        d = rng.uniform(d0, d1)
        yield Phase(kind, t, t + d, rng.uniform(r0, r1))
        t += d
        kind = rng.choices(*nxt[kind])[0]


def fault_plan(
    opts: argparse.Namespace, duration: float, own_broker: bool, rng: random.Random
) -> list[tuple[float, str]]:
    """(t, kind) faults inside the load, at least opts.min_gap_s apart, none in the last 5 s."""
    plan: list[tuple[float, str]] = []

    def every(period: float, kind: str, jitter: float) -> None:
        t = period
        while period > 0 and t < duration:
            plan.append((t * rng.uniform(1 - jitter, 1 + jitter) if jitter else t, kind))
            t += period

    jitter = 0.0 if opts.ci else 0.2
    every(opts.reload_s, "reload", jitter)
    if opts.kill_s is None:
        plan.append((0.45 * duration, "kill"))
    else:
        every(opts.kill_s, "kill", jitter)
    if own_broker:
        if opts.broker_restart_s is None:
            plan.append((0.70 * duration, "broker_restart"))
        else:
            every(opts.broker_restart_s, "broker_restart", jitter)
    plan.sort()
    spaced: list[tuple[float, str]] = []
    for t, kind in plan:
        if spaced and t < spaced[-1][0] + opts.min_gap_s:
            t = spaced[-1][0] + opts.min_gap_s
        if t < duration - 5:
            spaced.append((t, kind))
    return spaced


# ---- sampling ----------------------------------------------------------------------------------
_procs: dict[int, psutil.Process] = {}


def _proc(pid: int) -> psutil.Process:
    p = _procs.get(pid)
    if p is None or not p.is_running():  # is_running() also catches a reused pid
        p = _procs[pid] = psutil.Process(pid)
        p.cpu_percent(None)
    return p


def _status_mb(pid: int) -> dict[str, float]:
    """RssAnon, RssShmem and VmSwap of /proc/PID/status, in MB (readable without privileges)."""
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssShmem", "VmSwap"):
                out[k] = int(v.split()[0]) / 1024
    except OSError:
        raise psutil.NoSuchProcess(pid) from None
    return out


def memory(pid: int) -> dict[str, float]:
    """MB: rss; pss and uss (psutil memory_full_info; rss when PSS is not readable, pss_ok 0);
    pool (PSS of the frame pool's memfd mappings); anon = RssAnon + VmSwap (the gated metric)."""
    p = _proc(pid)
    out: dict[str, float] = {"rss": p.memory_info().rss / MB}
    # three reads 30 ms apart, the smallest kept: a large frame being decoded or copied at the instant
    # of the sample (decoding a 1280x960 PNG takes ~20 MB for some ms) would otherwise look like growth
    reads = []
    for i in range(3):
        if i:
            time.sleep(0.03)
        reads.append(_status_mb(pid))
    status = min(reads, key=lambda st: st.get("RssAnon", 0.0) + st.get("VmSwap", 0.0))
    out["anon"] = status.get("RssAnon", float("nan")) + status.get("VmSwap", 0.0)
    try:
        full = p.memory_full_info()  # PSS and USS come from /proc/PID/smaps_rollup: root or the same user
        pool = 0.0
        in_pool = False
        with open(f"/proc/{pid}/smaps", "rb") as fh:
            for line in fh:
                if line[:1] in HEX:  # a mapping's header line: "addr-addr perms offset dev inode path"
                    in_pool = b"memfd:edged-pool" in line
                elif in_pool and line.startswith(b"Pss:"):
                    pool += int(line.split()[1])
        out.update(pss=full.pss / MB, uss=full.uss / MB, pool=pool / 1024, pss_ok=1.0)
    except (PermissionError, psutil.AccessDenied):
        out.update(pss=out["rss"], uss=float("nan"), pool=status.get("RssShmem", float("nan")), pss_ok=0.0)
    except OSError:
        raise psutil.NoSuchProcess(pid) from None
    return out


class Sampler(threading.Thread):
    """Every sample_s: status over the socket, then /proc of the supervisor and the workers; one CSV row."""

    def __init__(self, path: Path, socket_path: str, pid: int, ledger: Ledger, every: float,
                 phase_of: Callable[[], tuple[str, float]]) -> None:
        super().__init__(name="sampler", daemon=True)
        self.socket_path, self.pid, self.ledger, self.every, self.phase_of = socket_path, pid, ledger, every, phase_of
        self.rows: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.lock = threading.Lock()
        self.stop_ev = threading.Event()
        self.mem_kinds: set[float] = set()
        self.status_failures = 0
        self.fh = open(path, "w", newline="")
        self.csv = csv.DictWriter(self.fh, COLUMNS)
        self.csv.writeheader()
        psutil.cpu_percent(None)

    def note(self, event: str) -> None:
        with self.lock:
            self.events.append(event)

    def run(self) -> None:
        nxt = time.monotonic()
        while not self.stop_ev.is_set():
            self.sample()
            nxt += self.every
            self.stop_ev.wait(max(0.0, nxt - time.monotonic()))

    def sample(self, phase: str | None = None) -> dict[str, Any]:
        try:
            st: dict[str, Any] = query(self.socket_path, timeout=5)
        except UnavailableError:
            st = {}
            self.status_failures += 1
        row: dict[str, Any] = {"t_s": round(time.monotonic() - self.ledger.t0, 2)}
        ph, rate = self.phase_of()
        row.update(phase=phase or ph, rate_fps=round(rate, 1), state=st.get("state", "unreachable"))
        row.update(self.ledger.window())
        with contextlib.suppress(psutil.Error):
            m = memory(self.pid)
            self.mem_kinds.add(m["pss_ok"])
            p = _proc(self.pid)
            row.update(sup_mem_mb=m["anon"], sup_pss_mb=m["pss"], sup_rss_mb=m["rss"], sup_uss_mb=m["uss"],
                       sup_pool_mb=m["pool"], sup_fds=p.num_fds(), sup_threads=p.num_threads(),
                       sup_cpu_pct=p.cpu_percent(None))
        workers = st.get("workers", [])
        ready = [w for w in workers if w.get("state") == "ready" and w.get("pid")]
        tot = {"mem": 0.0, "pss": 0.0, "rss": 0.0, "cpu": 0.0}
        age = float("inf")
        try:
            for w in ready:
                m = memory(int(w["pid"]))
                for k in ("mem", "pss", "rss"):
                    tot[k] += m["anon" if k == "mem" else k]
                wp = _proc(int(w["pid"]))
                tot["cpu"] += wp.cpu_percent(None)
                age = min(age, time.time() - wp.create_time())
            complete = bool(workers) and len(ready) == len(workers)
        except psutil.Error:  # a worker died between status and /proc
            complete = False
        row.update(workers_ready=len(ready), worker_pids=";".join(str(w["pid"]) for w in ready),
                   workers_min_age_s=round(age, 1) if ready else None)
        if complete:
            row.update(workers_mem_mb=tot["mem"], workers_pss_mb=tot["pss"], workers_rss_mb=tot["rss"],
                       workers_cpu_pct=tot["cpu"])
        pool, lat, fr, mq = st.get("pool", {}), st.get("latency_ms", {}), st.get("frames", {}), st.get("mqtt", {})
        if pool:
            row.update(pool_capacity_mb=pool.get("capacity_bytes", 0) / MB, pool_used_mb=pool.get("used_bytes", 0) / MB,
                       pool_high_water_mb=pool.get("high_water_bytes", 0) / MB,
                       pool_fragmentation=pool.get("fragmentation"), pool_segments=pool.get("segments"),
                       pool_grows=pool.get("grows"), pool_shrinks=pool.get("shrinks"))
        if st:
            row.update(queue_depth=st.get("queue_depth"), status_p50_ms=lat.get("p50"), status_p99_ms=lat.get("p99"),
                       daemon_received=fr.get("received"), daemon_completed=fr.get("completed"),
                       daemon_errors=fr.get("errors"), daemon_dropped=fr.get("dropped"),
                       mqtt_connected=int(bool(mq.get("connected"))), mqtt_reconnects=mq.get("reconnects"))
        row["sys_cpu_pct"] = psutil.cpu_percent(None)
        with self.lock:
            row["events"] = ";".join(self.events)
            self.events = []
            for k, v in row.items():
                if isinstance(v, float):
                    row[k] = round(v, 3)
            self.rows.append({k: row.get(k) for k in KEEP})
            self.csv.writerow(row)
            self.fh.flush()
        return row

    def halt(self) -> None:
        """Stop sampling on the clock (sample() may still be called)."""
        self.stop_ev.set()
        if self.is_alive():
            self.join(30)

    def close(self) -> None:
        self.halt()
        with self.lock:
            self.fh.close()


# ---- faults ------------------------------------------------------------------------------------
class Faults(threading.Thread):
    """Runs the fault plan: SIGHUP, worker SIGKILL, broker stop/start; waits for recovery from each."""

    def __init__(self, plan: list[tuple[float, str]], t0: float, pid: int, socket_path: str,
                 broker: Broker | None, link: Mqtt, sampler: Sampler, events_csv: Path, outage_s: float) -> None:
        super().__init__(name="faults", daemon=True)
        self.plan, self.t0, self.pid, self.socket_path = plan, t0, pid, socket_path
        self.broker, self.link, self.sampler, self.outage_s = broker, link, sampler, outage_s
        self.halt_ev = threading.Event()  # set at the end of the load: no new faults
        self.stop_ev = threading.Event()  # set at teardown: the thread ends
        self.idle = threading.Event()
        self.idle.set()
        self.done: list[dict[str, Any]] = []
        self.fh = open(events_csv, "w", newline="")
        self.csv = csv.DictWriter(self.fh, ["t_s", "kind", "ok", "recover_s", "detail"])
        self.csv.writeheader()
        self.rng = random.Random(len(plan))
        self.gap_s = 0.0  # least time from the end of one fault to the start of the next
        self.finished = threading.Event()  # the plan is done (or halted)
        self.opts: argparse.Namespace | None = None  # set by the profile's subclass, when it needs them

    def run(self) -> None:
        last_end = 0.0
        for t, kind in self.plan:
            if self.halt_ev.wait(max(0.0, self.t0 + t - time.monotonic(), last_end + self.gap_s - time.monotonic())):
                break
            self.idle.clear()
            start = time.monotonic()
            self.sampler.note(kind)
            self.started(kind)
            try:
                ok, detail = getattr(self, "_" + kind)()
            except Exception as exc:  # top of the fault loop: record it, keep soaking
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            self.ended(kind)
            rec = {"t_s": round(start - self.t0, 2), "kind": kind, "ok": ok,
                   "recover_s": round(time.monotonic() - start, 2), "detail": detail}
            self.done.append(rec)
            self.csv.writerow(rec)
            self.fh.flush()
            print(f"[{rec['t_s']:8.1f} s] {kind}: {'ok' if ok else 'NOT RECOVERED'} in {rec['recover_s']} s  {detail}",
                  flush=True)
            self.idle.set()
            last_end = time.monotonic()
        self.finished.set()
        # stays alive until close(): a broker restarted from this thread gets its parent-death
        # signal when this thread ends
        self.stop_ev.wait()

    def started(self, kind: str) -> None:
        """Called as a fault begins (a profile's hook)."""

    def ended(self, kind: str) -> None:
        """Called once a fault is recovered from, or not (a profile's hook)."""

    def _status(self) -> dict[str, Any]:
        try:
            return query(self.socket_path, timeout=5)
        except UnavailableError:
            return {}

    def _wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end and not self.stop_ev.is_set():
            if pred(self._status()):
                return True
            time.sleep(0.25)
        return False

    @staticmethod
    def _ready(st: dict[str, Any]) -> set[int]:
        return {int(w["pid"]) for w in st.get("workers", []) if w.get("state") == "ready" and w.get("pid")}

    def _reload(self) -> tuple[bool, str]:
        st = self._status()
        old, n = self._ready(st), len(st.get("workers", []))
        os.kill(self.pid, signal.SIGHUP)
        ok = self._wait(lambda s: len(self._ready(s)) == n and not self._ready(s) & old, 90)
        return ok, f"workers {sorted(old)} -> {sorted(self._ready(self._status()))}"

    def _kill(self) -> tuple[bool, str]:
        st = self._status()
        ready, n = sorted(self._ready(st)), len(st.get("workers", []))
        if not ready:
            return False, "no ready worker to kill"
        victim = self.rng.choice(ready)
        os.kill(victim, signal.SIGKILL)
        ok = self._wait(lambda s: len(self._ready(s)) == n and victim not in self._ready(s), 60)
        return ok, f"SIGKILL worker {victim}; ready now {sorted(self._ready(self._status()))}"

    def _broker_restart(self) -> tuple[bool, str]:
        assert self.broker is not None
        self.broker.stop()
        saved = self.broker.store is not None and (self.broker.store / "mosquitto.db").exists()
        self.stop_ev.wait(self.outage_s)
        self.broker.start()
        ok = self._wait(lambda s: bool(s.get("mqtt", {}).get("connected")) and self.link.up, 90)
        note = "" if saved else "; the broker saved no persistence file (see mosquitto.log): sessions lost"
        return ok and saved, f"broker down {self.outage_s:.0f} s on port {self.broker.port}{note}"

    def close(self) -> None:
        self.halt_ev.set()
        self.stop_ev.set()
        if self.is_alive():
            self.join(60)
        if not self.fh.closed:
            self.fh.close()


# ---- verdict -----------------------------------------------------------------------------------
def slope_mb_h(rows: list[dict[str, Any]], key: str) -> tuple[float, int]:
    pts = [(r["t_s"] / 3600, float(r[key])) for r in rows if _num(r.get(key))]
    if len(pts) < 3:
        return float("nan"), len(pts)
    tm = statistics.fmean(p[0] for p in pts)
    ym = statistics.fmean(p[1] for p in pts)
    var = sum((t - tm) ** 2 for t, _ in pts)
    if var == 0:
        return float("nan"), len(pts)
    return sum((t - tm) * (y - ym) for t, y in pts) / var, len(pts)


def within_life_slope_mb_h(rows: list[dict[str, Any]], key: str) -> tuple[float, int, int]:
    """Pooled least-squares slope with one intercept per worker set (the worker_pids column): growth
    inside each worker's life, blind to the steps where a reload or a kill replaced a worker."""
    groups: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for r in rows:
        if _num(r.get(key)) and r.get("worker_pids"):
            groups[str(r["worker_pids"])].append((r["t_s"] / 3600, float(r[key])))
    num = den = 0.0
    n = 0
    lives = [g for g in groups.values() if len(g) >= 3]
    for g in lives:
        tm = statistics.fmean(t for t, _ in g)
        ym = statistics.fmean(y for _, y in g)
        num += sum((t - tm) * (y - ym) for t, y in g)
        den += sum((t - tm) ** 2 for t, _ in g)
        n += len(g)
    return (num / den if den else float("nan")), n, len(lives)


def floor_slope_mb_h(rows: list[dict[str, Any]], key: str, windows: int = 10) -> tuple[float, int]:
    """Least-squares slope through the minimum of each of `windows` equal time slices: transient
    allocations (a large frame in flight) drop out, a rising floor (a leak) stays."""
    pts = [r for r in rows if _num(r.get(key))]
    if len(pts) < 2 * windows:
        return float("nan"), 0
    t0, t1 = pts[0]["t_s"], pts[-1]["t_s"] + 1e-9
    width = (t1 - t0) / windows
    mins = []
    for i in range(windows):
        sl = [float(r[key]) for r in pts if t0 + i * width <= r["t_s"] < t0 + (i + 1) * width]
        if sl:
            mins.append({"t_s": t0 + (i + 0.5) * width, key: min(sl)})
    return slope_mb_h(mins, key)[0], len(mins)


def _num(v: Any) -> bool:
    if v is None or v == "":
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _median(rows: list[dict[str, Any]], key: str) -> float:
    vals = [float(r[key]) for r in rows if _num(r.get(key))]
    return statistics.median(vals) if vals else float("nan")


def _round(v: float, nd: int = 3) -> float | None:
    return round(v, nd) if math.isfinite(v) else None


@dataclass
class Check:
    name: str
    value: Any
    limit: Any
    ok: bool | None  # None: reported, not gated
    why: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "limit": self.limit,
                "result": "report" if self.ok is None else ("pass" if self.ok else "fail"), "why": self.why}


@dataclass
class RunFacts:
    load_s: float
    rows: list[dict[str, Any]]
    final_rows: list[dict[str, Any]]
    faults: list[dict[str, Any]]
    daemon_exit: int | None
    daemon_died: str | None
    mem_kinds: set[float]
    extra: dict[str, Any] = field(default_factory=dict)
    more_checks: list[Check] = field(default_factory=list)  # a profile's own (tools/soak_site.py)


def verdict(opts: argparse.Namespace, ledger: Ledger, facts: RunFacts) -> dict[str, Any]:
    T = facts.load_s
    load = [r for r in facts.rows if r["phase"] not in ("drain", "quiet", "final")]
    half = [r for r in load if r["t_s"] >= T / 2]
    base = [r for r in load if T / 2 <= r["t_s"] < 5 * T / 8]
    lost_acked, lost_unacked, lost_ex = ledger.lost()
    checks: list[Check] = []
    lost = ledger.sent - ledger.answered
    checks.append(Check("frames lost (sent - answered)", lost, 0, lost == 0,
                        f"{lost_acked} acknowledged by the broker, {lost_unacked} never acknowledged"))
    wrong = sum(ledger.wrong.values())
    checks.append(Check("wrong answers", wrong, 0, wrong == 0, "; ".join(f"{k}: {v}" for k, v in ledger.wrong.items())))
    checks.append(Check("duplicate results", ledger.duplicates, None, None, "at least once: redelivery after faults"))
    bad_faults = [f for f in facts.faults if not f["ok"]]
    checks.append(
        Check(
            "faults recovered",
            f"{len(facts.faults) - len(bad_faults)}/{len(facts.faults)}",
            "all",
            not bad_faults,
            "; ".join(f"{f['kind']} at {f['t_s']} s: {f['detail']}" for f in bad_faults),
        )
    )
    if facts.daemon_died is not None:
        checks.append(Check("daemon alive", facts.daemon_died, "alive", False))
    if facts.daemon_exit is not None or opts.own:
        checks.append(Check("daemon exit status on SIGTERM", facts.daemon_exit, 0, facts.daemon_exit == 0))

    mem_note = "private memory: RssAnon + VmSwap from /proc/PID/status (heap, arenas, stacks; no pool, no libraries)"
    pss_note = ("PSS from psutil memory_full_info" if facts.mem_kinds == {1.0} else
                "PSS not readable (needs root or the daemon's user): the PSS columns hold RSS")
    sup, n_sup = slope_mb_h(half, "sup_mem_mb")
    warm = [
        r for r in half if _num(r.get("workers_min_age_s")) and float(r["workers_min_age_s"]) >= opts.worker_warmup_s
    ]
    wrk, n_wrk = slope_mb_h(warm, "workers_mem_mb")
    # a fit over the second half cannot tell less than --resolve-mb of change from jitter
    floor = opts.resolve_mb / (T / 2 / 3600) if T else float("inf")

    def eff(limit: float | None) -> float | None:
        return None if limit is None else round(max(limit, floor), 3)

    for name, val, n, limit, what in (
            ("supervisor memory slope MB/h", sup, n_sup, eff(opts.max_slope_mb_h), ""),
            ("workers memory slope MB/h (sum)", wrk, n_wrk, eff(opts.max_worker_slope_mb_h),
             f" with every worker older than {opts.worker_warmup_s:g} s")):
        gated = n >= 5 and limit is not None
        checks.append(Check(name, _round(val), limit, (math.isfinite(val) and val <= limit) if gated else None,
                            f"least squares over {n} samples, t >= {T / 2:.0f} s{what}" +
                            ("" if n >= 5 else ": too few samples")))
    within, n_within, lives = within_life_slope_mb_h(warm, "workers_mem_mb")
    checks.append(Check("worker memory slope within a life MB/h", _round(within), None, None,
                        f"least squares, one intercept per worker set: {lives} lives, {n_within} samples"))

    val, n = floor_slope_mb_h(half, "sup_mem_mb")
    checks.append(Check("supervisor memory floor slope MB/h", _round(val), None, None,
                        f"least squares over the minima of {n} time windows"))
    for key, label in (("sup_pss_mb", "supervisor PSS slope MB/h (pool included)"),
                       ("sup_rss_mb", "supervisor RSS slope MB/h (pool included)")):
        val, n = slope_mb_h(half, key)
        checks.append(Check(label, _round(val), None, None, f"{n} samples; " + (pss_note if "PSS" in label else "")))

    final = facts.final_rows
    for key, label, limit in (("sup_fds", "supervisor fd growth", opts.max_fd_growth),
                              ("sup_threads", "supervisor thread growth", opts.max_thread_growth)):
        b, f = _median(base, key), _median(final, key)
        growth = f - b
        gated = math.isfinite(growth)
        checks.append(Check(label, _round(growth, 1), limit, (growth <= limit) if gated else None,
                            f"final median {f} (at rest) - baseline median {b} ({len(base)} samples, "
                            f"{T / 2:.0f}-{5 * T / 8:.0f} s)"))
    caps = [float(r["pool_capacity_mb"]) for r in facts.rows if _num(r.get("pool_capacity_mb"))]
    pool_final = _median(final, "pool_capacity_mb")
    if caps and math.isfinite(pool_final):
        checks.append(Check("pool capacity at rest MB", _round(pool_final), _round(min(caps)),
                            pool_final <= min(caps) + 1e-6,
                            f"must be back at the smallest capacity seen; peak {max(caps):.1f} MB"))

    q2, n2 = ledger.p99_between(T / 4, T / 2)
    q4, n4 = ledger.p99_between(3 * T / 4, T + ledger.slot_s)
    ratio = q4 / q2 if q2 and math.isfinite(q2) and math.isfinite(q4) else float("nan")
    gated_drift = opts.max_p99_drift is not None and n2 >= 50 and n4 >= 50
    drift_ok = not (math.isfinite(ratio) and ratio > (opts.max_p99_drift or 0) and q4 - q2 > opts.p99_floor_ms)
    what = " of dispatch to reply (total - queue)" if ledger.service_latency else ""
    checks.append(Check(f"p99 drift{what} (last quarter / second quarter)", _round(ratio), opts.max_p99_drift,
                        drift_ok if gated_drift else None,
                        f"p99 {q2} ms ({n2} results) -> {q4} ms ({n4} results); floor {opts.p99_floor_ms} ms"
                        + (f"; {ledger.aside} results left aside ({getattr(opts, 'aside_what', '')})"
                           if ledger.aside else "")))
    if ledger.aside:
        a2, m2 = ledger.p99_between(T / 4, T / 2, everything=True)
        a4, m4 = ledger.p99_between(3 * T / 4, T + ledger.slot_s, everything=True)
        r_all = a4 / a2 if a2 and math.isfinite(a2) and math.isfinite(a4) else float("nan")
        checks.append(Check("p99 drift of total, every result", _round(r_all), None, None,
                            f"p99 {a2} ms ({m2} results) -> {a4} ms ({m4} results)"))

    checks.extend(facts.more_checks)
    ok = all(c.ok is not False for c in checks) and ledger.sent > 0
    faults = collections.Counter(f["kind"] for f in facts.faults)
    faults_ok = collections.Counter(f["kind"] for f in facts.faults if f["ok"])
    last = facts.rows[-1] if facts.rows else {}
    return {
        "pass": ok,
        "mode": getattr(opts, "profile", None) or ("ci" if opts.ci else "long"),
        "load_s": round(T, 1),
        "out": str(opts.out),
        "frames": {
            "sent": ledger.sent,
            "acked": ledger.acked,
            "answered": ledger.answered,
            "lost": lost,
            "lost_acked_by_broker": lost_acked,
            "lost_never_acked": lost_unacked,
            "duplicates": ledger.duplicates,
            "unexpected": ledger.unexpected,
            "ok": ledger.answered - ledger.errors,
            "errors": ledger.errors,
            "errors_by_code_good_frames": dict(ledger.codes),
            "bad_frames_sent": ledger.bad_sent,
            "errors_by_code_bad_frames": dict(ledger.bad_codes),
            "puback_failures": dict(ledger.puback_failures),
            "mean_rate_fps": round(ledger.sent / T, 1) if T else 0.0,
        },
        "faults": {k: {"done": v, "recovered": faults_ok[k]} for k, v in faults.items()},
        "memory": {
            "metric": mem_note,
            "pss": pss_note,
            "supervisor_slope_mb_h": _round(sup),
            "workers_slope_mb_h": _round(wrk),
            "supervisor_first_mb": load[0].get("sup_mem_mb") if load else None,
            "supervisor_last_mb": last.get("sup_mem_mb"),
            "workers_last_mb": _median(final, "workers_mem_mb") if final else None,
        },
        "latency_ms": {
            "q2_p99": _round(q2),
            "q4_p99": _round(q4),
            "drift": _round(ratio),
            "status_p50": last.get("status_p50_ms"),
            "status_p99": last.get("status_p99_ms"),
        },
        "thresholds": {
            "max_slope_mb_h": opts.max_slope_mb_h,
            "max_worker_slope_mb_h": opts.max_worker_slope_mb_h,
            "resolve_mb": opts.resolve_mb,
            "worker_warmup_s": opts.worker_warmup_s,
            "max_fd_growth": opts.max_fd_growth,
            "max_thread_growth": opts.max_thread_growth,
            "max_p99_drift": opts.max_p99_drift,
            "p99_floor_ms": opts.p99_floor_ms,
        },
        "checks": [c.as_dict() for c in checks],
        "lost_examples": lost_ex,
        "wrong_examples": ledger.wrong_examples,
        "fault_log": facts.faults[-50:],
        **facts.extra,
    }


def print_verdict(v: dict[str, Any]) -> None:
    f = v["frames"]
    print()
    print(f"edged soak verdict: {'PASS' if v['pass'] else 'FAIL'}  ({v['mode']}, {v['load_s']:.0f} s of load, "
          f"{f['mean_rate_fps']} frames/s on average)")
    print(f"  frames   sent {f['sent']}  answered {f['answered']}  lost {f['lost']}  duplicates {f['duplicates']}  "
          f"ok {f['ok']}  errors {f['errors']}  unexpected {f['unexpected']}")
    print(f"  errors   good frames {f['errors_by_code_good_frames'] or '{}'}  bad frames ({f['bad_frames_sent']} sent) "
          f"{f['errors_by_code_bad_frames'] or '{}'}")
    print("  faults   " + ("  ".join(f"{k} {x['recovered']}/{x['done']}" for k, x in v["faults"].items()) or "none"))
    print(f"  memory   {v['memory']['metric']}")
    width = max(len(c["name"]) for c in v["checks"])
    for c in v["checks"]:
        mark = {"pass": "PASS", "fail": "FAIL", "report": "    "}[c["result"]]
        lim = "" if c["limit"] is None else f"(limit {c['limit']})"
        print(f"  {mark}  {c['name']:<{width}}  {c['value']!s:>10} {lim:<16} {c['why']}")
    for ex in v["lost_examples"][:5]:
        print(f"  lost: {ex}")
    for ex in v["wrong_examples"][:5]:
        print(f"  wrong: {ex['frame_id']} {ex['what']}: {json.dumps(ex['result'])[:200]}")
    print(f"  outputs  {v['out']}/{{samples.csv, events.csv, soak.png, verdict.json}}", flush=True)


# ---- plot --------------------------------------------------------------------------------------
def plot(out: Path) -> str:
    """soak.png from samples.csv and events.csv; returns what happened, in words."""
    try:
        import matplotlib
    except ImportError:
        return "soak.png skipped: matplotlib is not installed (pip install matplotlib; then tools/soak.py --plot DIR)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "samples.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return "soak.png skipped: no samples"
    events = []
    if (out / "events.csv").exists():
        with open(out / "events.csv", newline="") as fh:
            events = list(csv.DictReader(fh))
    span = float(rows[-1]["t_s"])
    unit, div = ("h", 3600.0) if span > 3 * 3600 else ("min", 60.0)
    t = [float(r["t_s"]) / div for r in rows]

    def col(key: str) -> list[float]:
        return [float(r[key]) if _num(r.get(key)) else float("nan") for r in rows]

    fig, ax = plt.subplots(4, 1, figsize=(12, 11), sharex=True)
    ax[0].plot(t, col("sup_mem_mb"), color="tab:blue", label="supervisor private (RssAnon+swap, gated)")
    ax[0].plot(t, col("sup_pss_mb"), color="tab:blue", ls=":", label="supervisor PSS (with pool)")
    ax[0].plot(t, col("workers_mem_mb"), color="tab:green", label="workers private, sum")
    ax[0].plot(t, col("workers_pss_mb"), color="tab:green", ls=":", label="workers PSS, sum")
    ax[0].set_ylabel("MB")
    ax[0].set_title("memory")
    ax[1].plot(t, col("pool_capacity_mb"), label="pool capacity")
    ax[1].plot(t, col("pool_used_mb"), label="pool used")
    ax[1].set_ylabel("MB")
    ax[1].set_title("frame pool")
    if any(_num(r.get("pool_shrinks")) for r in rows):
        ax1b = ax[1].twinx()
        ax1b.plot(t, col("pool_shrinks"), color="tab:gray", ls="--", label="segments given back (cumulative)")
        ax1b.set_ylabel("count")
        ax1b.legend(loc="upper right", fontsize=7)
    ax[2].plot(t, col("win_p50_ms"), label="p50 (per sample)")
    ax[2].plot(t, col("win_p99_ms"), label="p99 (per sample)")
    ax[2].plot(t, col("status_p99_ms"), label="p99 since start (status)", alpha=0.6)
    ax[2].set_yscale("log")
    ax[2].set_ylabel("ms")
    ax[2].set_title("latency (daemon timing_ms.total)")
    ax[3].plot(t, col("rate_fps"), label="target frames/s", alpha=0.6)
    ax[3].plot(t, col("outstanding"), label="outstanding frames")
    ax3b = ax[3].twinx()
    ax3b.plot(t, col("sup_fds"), color="tab:red", label="supervisor fds")
    ax3b.plot(t, col("sup_threads"), color="tab:purple", label="supervisor threads")
    ax3b.set_ylabel("count")
    ax[3].set_title("load; fds and threads")
    ax[3].set_xlabel(unit)
    colors = {"reload": "0.7", "kill": "tab:red", "broker_restart": "tab:blue", "failover": "tab:orange",
              "failback": "tab:green", "update": "tab:olive", "update_rejected": "tab:brown",
              "update_rolled_back": "tab:pink"}
    lw, alpha = (0.6, 0.5) if len(events) < 150 else (0.3, 0.25)  # site72h: ~530 faults
    for e in events:
        for a in ax:
            a.axvline(float(e["t_s"]) / div, color=colors.get(e["kind"], "0.5"), lw=lw, alpha=alpha)
    for a in ax:
        a.legend(loc="upper left", fontsize=7)
    ax3b.legend(loc="upper right", fontsize=7)
    kinds = {e["kind"] for e in events}
    site = "; orange/green: fail-over/back, olive/brown/pink: update applied/rejected/rolled back" \
        if kinds & {"failover", "update"} else ""
    fig.suptitle(f"edged soak: {out.name} (grey: reload, red: worker kill, blue: broker restart{site})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=90)
    plt.close(fig)
    return f"soak.png written: {out / 'soak.png'}"


# ---- the run -----------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Soak edged under mixed load with faults; write samples, plot, verdict.")
    dur = ap.add_mutually_exclusive_group()
    dur.add_argument("--hours", type=float)
    dur.add_argument("--minutes", type=float)
    ap.add_argument("--ci", action="store_true", help="compressed schedule (default 3 min), CI thresholds")
    ap.add_argument("--out", type=Path, help="output dir (default soak-out/<timestamp>)")
    ap.add_argument("--plot", type=Path, metavar="DIR", help="only redraw DIR/soak.png from DIR/samples.csv")
    ap.add_argument("--model", default=str(BUNDLED / "digits.tflite"))
    ap.add_argument("--labels", help="default: the bundled digits labels with the bundled model, else none")
    ap.add_argument("--task", default="classify", choices=["classify", "detect", "raw"])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--broker", metavar="HOST:PORT", help="use this broker and a running daemon")
    ap.add_argument("--prefix", help="the running daemon's topic prefix")
    ap.add_argument("--socket", help="the running daemon's status socket")
    ap.add_argument("--pid", type=int, help="the running daemon's supervisor pid (for SIGHUP and /proc)")
    ap.add_argument("--sample-s", type=float, help="seconds between samples (default 10; --ci 2)")
    ap.add_argument("--reload-s", type=float, help="seconds between SIGHUP reloads, 0 for none (300; --ci 40)")
    ap.add_argument("--kill-s", type=float, help="seconds between worker kills, 0 for none (1200; --ci once at 45%%)")
    ap.add_argument("--broker-restart-s", type=float,
                    help="seconds between broker restarts, 0 for none (1800; --ci once at 70%%)")
    ap.add_argument("--outage-s", type=float, help="broker down time per restart (5; --ci 3)")
    ap.add_argument("--min-gap-s", type=float, default=8.0, help="least time between two faults")
    ap.add_argument("--bad-share", type=float, default=0.05, help="share of bad frames")
    ap.add_argument("--max-outstanding", type=int, default=200, help="unanswered frames before sending waits")
    ap.add_argument("--drain-s", type=float, help="final wait for every answer (300; --ci 60)")
    ap.add_argument("--quiet-s", type=float, default=15.0,
                    help="rest after the drain before the final samples (> pool.idle_release_s)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-slope-mb-h", type=float, help="supervisor memory slope limit (2; --ci 60)")
    ap.add_argument("--max-worker-slope-mb-h", type=float, help="workers' memory slope limit (2; --ci: report only)")
    ap.add_argument("--worker-warmup-s", type=float,
                    help="worker samples count for the slope once every worker is this old (60; --ci 15)")
    ap.add_argument("--resolve-mb", type=float, default=1.0,
                    help="slope limits are at least this many MB per second half (short runs)")
    ap.add_argument("--max-fd-growth", type=float, default=0)
    ap.add_argument("--max-thread-growth", type=float, default=0)
    ap.add_argument("--max-p99-drift", type=float, help="p99 ratio limit (2.0; --ci: report only)")
    ap.add_argument("--p99-floor-ms", type=float, default=25.0)
    ap.add_argument("--profile", choices=["site72h"],
                    help="site72h: 72 hours of a busy site's frames and faults in ~1 hour (tools/soak_site.py)")
    ap.add_argument("--scale", type=float, default=1.0, help="with --profile: every planned count times this")
    ap.add_argument("--rate", type=float, default=300.0, help="with --profile: frames/s in its steady phases")
    o = ap.parse_args(argv)
    if o.plot:
        return o
    external = [o.broker, o.prefix, o.socket, o.pid]
    if any(external) and not all(external):
        ap.error("--broker, --prefix, --socket and --pid go together (a running daemon and broker)")
    o.own = not any(external)
    if o.labels is None and Path(o.model).resolve() == (BUNDLED / "digits.tflite").resolve():
        o.labels = str(BUNDLED / "digits_labels.txt")
    ci = o.ci
    o.duration_s = (o.hours * 3600 if o.hours is not None else o.minutes * 60 if o.minutes is not None
                    else 180 if ci else 3600)
    if o.profile:
        import soak_site  # tools/ is on sys.path: this script's directory

        soak_site.configure(o, ap)  # its counts, schedule, config knobs and defaults
    if o.duration_s < 20:
        ap.error("run at least 20 seconds")
    defaults = {
        "sample_s": (2, 10),
        "worker_warmup_s": (15, 60),
        "reload_s": (40, 300),
        "outage_s": (3, 5),
        "drain_s": (60, 300),
        "max_slope_mb_h": (60, 2.0),
    }
    for k, (c, long_) in defaults.items():
        if getattr(o, k) is None:
            setattr(o, k, c if ci else long_)
    if not ci:
        o.kill_s = 1200 if o.kill_s is None else o.kill_s
        o.broker_restart_s = 1800 if o.broker_restart_s is None else o.broker_restart_s
        o.max_p99_drift = 2.0 if o.max_p99_drift is None else o.max_p99_drift
        o.max_worker_slope_mb_h = 2.0 if o.max_worker_slope_mb_h is None else o.max_worker_slope_mb_h
    if o.profile:
        o.site.limits(o)  # the profile's limits: given flags win, None means report-only
    if o.out is None:
        o.out = ROOT / "soak-out" / time.strftime("%Y%m%d-%H%M%S")
    return o


class Stop:
    """SIGINT/SIGTERM end the load early; the drain and the verdict still happen."""

    def __init__(self) -> None:
        self.ev = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.ev.set())


def run(opts: argparse.Namespace) -> int:
    out: Path = opts.out
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="edged-soak-"))
    run_id = f"{os.getpid():x}{int(time.time()) % 100000:05d}"
    stop = Stop()
    broker: Broker | None = None
    daemon: OwnDaemon | None = None
    link: Mqtt | None = None
    sampler: Sampler | None = None
    faults: Faults | None = None
    extra: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    try:
        site = getattr(opts, "site", None)  # a profile (tools/soak_site.py), or None
        if site is not None:
            site.setup(opts, out, tmp)
        if opts.own:
            broker = own_broker(out)
            broker.start()
            daemon = OwnDaemon(out, tmp, broker, opts, run_id)
            pid, sock, prefix, host, port = daemon.start(), daemon.socket, daemon.prefix, broker.host, broker.port
        else:
            host, _, port_s = opts.broker.rpartition(":")
            pid, sock, prefix, port = opts.pid, opts.socket, opts.prefix.rstrip("/"), int(port_s)
            if not psutil.pid_exists(pid):
                raise UnavailableError(f"no process {pid} (--pid)")
        st = wait_online(sock, daemon, 90)
        inp = st.get("model", {}).get("input") or {}
        print(f"daemon online: pid {pid}, model {st.get('model', {}).get('name')} input {inp}, "
              f"{len(st.get('workers', []))} worker(s); broker {host}:{port}; prefix {prefix}; out {out}", flush=True)
        frames = (site.frames if site else FrameSet)(opts.seed, inp.get("shape") or [1], inp.get("dtype") or "uint8",
                                                     opts.bad_share)
        extra["frame_sizes_bytes"] = {**frames.sizes(), "raw": frames.raw_bytes}
        extra["daemon"] = {"pid": pid, "socket": sock, "prefix": prefix, "broker": f"{host}:{port}",
                           "model": st.get("model", {}).get("path"), "owned": opts.own}
        plan = (site.plan(opts) if site else fault_plan(opts, opts.duration_s, opts.own, random.Random(opts.seed + 2)))
        ledger = Ledger(run_id, slot_s=min(60.0, max(1.0, opts.duration_s / 48)))
        link = Mqtt(host, port, prefix, run_id, ledger)
        link.start()
        current = {"phase": "load", "rate": 0.0}
        sampler = Sampler(out / "samples.csv", sock, pid, ledger, opts.sample_s,
                          lambda: (str(current["phase"]), float(current["rate"])))
        ledger.t0 = time.monotonic()
        faults = (site.SiteFaults if site else Faults)(plan, ledger.t0, pid, sock, broker, link, sampler,
                                                       out / "events.csv", opts.outage_s)
        if site is not None:
            site.attach(opts, faults, ledger, host, port, prefix)
        sampler.start()
        faults.start()
        print(f"load: {opts.duration_s:.0f} s, faults planned: {dict(collections.Counter(k for _, k in plan))}, "
              f"sampling every {opts.sample_s:g} s", flush=True)

        def alive() -> str | None:
            if daemon is not None:
                rc = daemon.exited()
                return None if rc is None else f"daemon exited {rc}"
            return None if psutil.pid_exists(pid) else f"daemon pid {pid} is gone"

        died = (site.drive if site else drive)(opts, ledger, link, frames, current, stop, alive, faults)
        load_s = time.monotonic() - ledger.t0
        # the drain: no new frames, no new faults; a fault still under way finishes first
        current.update(phase="drain", rate=0.0)
        faults.halt_ev.set()
        faults.idle.wait(150)
        end = time.monotonic() + opts.drain_s
        while ledger.answered < ledger.sent and time.monotonic() < end and died is None:
            with ledger.cond:
                ledger.cond.wait(0.5)
            died = alive()
        print(f"drain: {ledger.answered}/{ledger.sent} answered {time.monotonic() - ledger.t0 - load_s:.1f} s "
              f"after the load", flush=True)
        final_rows: list[dict[str, Any]] = []
        if died is None:
            current["phase"] = "quiet"
            time.sleep(opts.quiet_s)  # pool segments idle past pool.idle_release_s; no reload threads
            sampler.halt()
            for _ in range(3):
                final_rows.append(sampler.sample("final"))
                time.sleep(1)
            died = alive()
        sampler.close()
        link.close()
        link = None
        exit_status = daemon.stop() if daemon is not None else None
        daemon = None
        faults.close()
        more = site.checks(opts, ledger, sampler.rows, final_rows, faults, extra) if site else []
        facts = RunFacts(load_s, sampler.rows, final_rows, faults.done, exit_status, died, sampler.mem_kinds,
                         dict(extra, status_query_failures=sampler.status_failures), more)
        v = verdict(opts, ledger, facts)
        (out / "verdict.json").write_text(json.dumps(v, indent=2, default=str) + "\n")
        print_verdict(v)
        try:
            print(plot(out), flush=True)
        except Exception as exc:  # the verdict stands without the picture
            print(f"soak.png failed: {type(exc).__name__}: {exc}", flush=True)
        return 0 if v["pass"] else EX_FAIL
    except UnavailableError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    finally:
        # teardown order: our clients, the daemon (it still has its broker), the fault thread (its
        # restarted broker gets its parent-death signal when that thread ends), the broker
        closers: list[Callable[[], Any]] = [lambda: link and link.close(), lambda: sampler and sampler.close(),
                                            lambda: daemon and daemon.stop(), lambda: faults and faults.close(),
                                            lambda: broker and broker.close()]
        for closer in closers:
            with contextlib.suppress(Exception):
                closer()
        shutil.rmtree(tmp, ignore_errors=True)


def wait_online(sock: str, daemon: OwnDaemon | None, timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < end:
        if daemon is not None and daemon.exited() is not None:
            raise UnavailableError(f"edged exited {daemon.exited()} at start; see {daemon.log}")
        try:
            st = query(sock, timeout=5)
            if st.get("state") == "online":
                return st
            last = f"state {st.get('state')}"
        except UnavailableError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise UnavailableError(f"edged not online within {timeout:.0f} s ({last})")


def drive(opts: argparse.Namespace, ledger: Ledger, link: Mqtt, frames: FrameSet, current: dict[str, Any],
          stop: Stop, alive: Callable[[], str | None], faults: Faults | None = None) -> str | None:
    """Send frames by the phase schedule until the duration is over; returns why the daemon died, if it did."""
    names = list(STREAMS)
    shares = [STREAMS[s][0] for s in names]
    rng = random.Random(opts.seed + 1)  # streams; the phases have their own, so the schedule repeats per seed
    gen = phases(random.Random(opts.seed), opts.ci)
    phase = next(gen)
    credit, last = 0.0, time.monotonic()
    next_check = 0.0
    while not stop.ev.is_set():
        now = time.monotonic()
        t = now - ledger.t0
        if t >= opts.duration_s:
            return None
        while t >= phase.end:
            phase = next(gen)
        current.update(phase=phase.kind, rate=phase.rate)
        if now >= next_check:
            next_check = now + 1.0
            died = alive()
            if died is not None:
                return died + " during the load"
        credit = min(credit + phase.rate * (now - last), max(1.0, phase.rate * 0.1))
        last = now
        if phase.rate == 0:
            credit = 0.0
            stop.ev.wait(min(0.2, max(0.0, phase.end - t)))
            continue
        while credit >= 1 and not stop.ev.is_set():
            if not link.up or not ledger.wait_below(opts.max_outstanding, 0.05):
                credit = 0.0  # missed frames are skipped, not caught up
                time.sleep(0.02)
                break
            stream = rng.choices(names, weights=shares)[0]
            payload, bad, ctype = frames.pick(stream)
            seq = ledger.new_frame(stream, bad)
            ledger.published(seq, link.send(stream, payload, ledger.frame_id(seq), ctype))
            credit -= 1
        stop.ev.wait(min(0.02, 1.0 / phase.rate))
    return None


def main(argv: list[str] | None = None) -> int:
    opts = parse(sys.argv[1:] if argv is None else argv)
    if opts.plot:
        msg = plot(opts.plot)
        print(msg)
        return 0 if msg.startswith("soak.png written") else EX_FAIL
    return run(opts)


if __name__ == "__main__":
    sys.modules.setdefault("soak", sys.modules[__name__])  # tools/soak_site.py imports us by name: one copy
    sys.exit(main())
