"""The `site72h` profile of tools/soak.py: what 72 hours of a busy site send through one daemon, in about an hour.

    .venv/bin/python tools/soak.py --profile site72h              # `make soak-72h`; ~1 h at full rate
    .venv/bin/python tools/soak.py --profile site72h --scale 0.05 # every count x 0.05: a few minutes

This module owns the profile: its planned counts, its load (streams, frame mix, phases), the daemon
config knobs it needs, the faults soak.py does not have (accelerator fail-over and fail-back through
our fake Coral delegate, model updates over MQTT: applied, rejected, applied and rolled back) and the
checks that each planned count was done and recovered. Everything else (the broker and daemon we own,
the ledger, sampling, the other faults, the verdict, the plot) is soak.py's.

What 72 hours of a busy site are, counted (SITE_72H; --scale multiplies every count, at least 1 each):
1,050,000 frames (a busy site: ~4 frames/s around the clock), 1,000 pool grow/shrink cycles, 72
broker restarts (one an hour), 72 worker kills, 216 SIGHUP reloads (one every 20 minutes), 72
accelerator fail-overs and 72 fail-backs, 24 model updates over MQTT (15 applied, 6 rejected, 3
applied and then rolled back by hand), 288 short-lived stream names. Compression is by rate: frames
go at --rate (300/s steady, 1.5x in bursts, none in idle spells); the faults are spread evenly over
the time the frames need and run one at a time, each waiting for its recovery. The load ends when
every planned frame was sent and every planned fault done, or at the cap (2.4 h x scale + 3 min):
then the count checks fail, they do not silently pass.

Config knobs it sets (configs/edged.yaml has them): pool.initial_mb 0.5, segment_mb 0.5,
idle_release_s 0.5 (so a 1-3 s idle spell gives grown segments back: one grow/shrink cycle per
burst); accelerator.prefer [coral, cpu] with the fake delegate (tests/fake_delegate.c, built here
the way tests/test_health.py builds it, with cc) and health failures 2 in 8 s, probe 1-2 s; sandbox
frame_timeout_s 3; model.update on with a key made here, probation_s 0 (a worker kill during a
probation would roll the update back: a real outcome, but not the planned one; rollbacks are by
hand, over the status socket, as `edged model rollback` does).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

import soak
from edged import bundle
from edged.errors import UnavailableError
from edged.status import command

ROOT = soak.ROOT
DELEGATE_SOURCE = ROOT / "tests" / "fake_delegate.c"
SAMPLE = soak.BUNDLED / "digits_sample.png"
SAMPLE_LABEL = "7"  # the bundled digits model's answer for its sample (tests/test_health.py)

SITE_72H: dict[str, int] = {"frames": 1_050_000, "pool_cycles": 1000, "streams": 288, "broker_restart": 72,
                            "kill": 72, "reload": 216, "failover": 72, "failback": 72, "update": 15,
                            "update_rejected": 6, "update_rolled_back": 3}
FAULT_KINDS = ("broker_restart", "kill", "reload", "failover", "failback", "update", "update_rejected",
               "update_rolled_back")
CAP_S = 2.4 * 3600  # the load's cap at scale 1 (the 2.5 h, less the drain and the rest)
DUTY = 0.8  # share of the load's time spent sending (steady and bursts; idle spells send nothing)

# stream -> (share, [(weight, kind)]): kind is "fmt:WxH", "raw" or "known" (the digits sample, top label known)
MIX: dict[str, tuple[float, list[tuple[float, str]]]] = {
    "cam1": (0.30, [(10, "jpeg:64x64"), (50, "jpeg:160x120"), (40, "jpeg:320x240")]),
    "cam2": (0.05, [(55, "jpeg:640x480"), (15, "jpeg:1280x960"), (15, "png:320x240"), (10, "png:640x480"),
                    (5, "png:1280x960")]),
    "cam3": (0.55, [(85, "raw"), (10, "known"), (5, "png:64x64")]),
    "visitor": (0.10, [(60, "raw"), (30, "jpeg:160x120"), (10, "bmp:64x64")]),
}
BURST_CAM2 = 0.20  # cam2's share in bursts: motion on the HD camera


def counts(scale: float) -> dict[str, int]:
    return {k: max(1, round(v * scale)) for k, v in SITE_72H.items()}


def configure(o: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    """Set the profile's options on soak.py's parsed ones (before its defaults fill the rest)."""
    if not o.own:
        ap.error("--profile site72h starts its own broker and daemon (it needs the fake delegate and an update key); "
                 "for a daemon already running use --hours/--minutes without a profile")
    if not 0 < o.scale <= 1 or o.rate <= 0:
        ap.error("--scale must be in (0, 1] and --rate above 0")
    if o.ci or o.hours is not None or o.minutes is not None:
        ap.error("--profile site72h sets its own length (--scale shortens it); --ci, --hours, --minutes do not apply")
    o.site = __import__(__name__)
    o.plan_counts = counts(o.scale)
    o.est_s = o.plan_counts["frames"] / (o.rate * DUTY)
    o.duration_s = CAP_S * o.scale + 180  # the cap; the load normally ends sooner (drive)
    o.sample_s = o.sample_s or 2.0
    o.outage_s = o.outage_s or 1.0
    o.worker_warmup_s = o.worker_warmup_s or 15.0
    o.drain_s = o.drain_s or 120.0
    o.quiet_s = max(o.quiet_s, 5.0)
    o.max_outstanding = max(o.max_outstanding, 400)
    o.bad_share = min(o.bad_share, 0.04)
    o.hostile_share = 0.01
    o.resolve_mb = min(o.resolve_mb, 0.5)  # see limits()
    o.given = {k: getattr(o, k) for k in ("max_slope_mb_h", "max_worker_slope_mb_h", "max_p99_drift")}
    o.aside_what = "in bursts and faults, and 1-2 s after each"
    o.reload_s = o.kill_s = o.broker_restart_s = 0  # the profile plans them (plan)


def limits(o: argparse.Namespace) -> None:
    """After soak.py's defaults: the profile's limits, unless given as flags (None: report-only)."""
    # 1 MB/h over the ~32 min second half of a full run is 0.5 MB: --resolve-mb 0.5 keeps the limit at 1 MB/h
    # there (1,000 samples resolve ~0.1 MB/h). Below scale 0.25 the slopes are report-only: the supervisor's
    # private memory warms up for ~10 minutes (scale 0.2, measured: 20.9 -> 24.0 MB over the first 650 s, flat
    # after), inside a short run's second half
    slope = 1.0 if o.scale >= 0.25 else None
    # p99 drift leaves aside the results of bursts and faults (and 1-2 s after each); report-only below scale
    # 0.05, where a quarter is seconds long and holds one fault more or less
    ours = {"max_slope_mb_h": slope, "max_worker_slope_mb_h": slope,
            "max_p99_drift": 1.5 if o.scale >= 0.05 else None}
    for k, v in ours.items():
        setattr(o, k, o.given[k] if o.given[k] is not None else v)


def build_delegate(dest: Path) -> Path:
    """tests/fake_delegate.c as tests/test_health.py builds it."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise UnavailableError("no C compiler (cc/gcc) to build tests/fake_delegate.c (apt-get install gcc)")
    lib = dest / "libfake_delegate.so"
    r = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", str(lib), str(DELEGATE_SOURCE), "-lm"],
                       check=False, capture_output=True, text=True)
    if r.returncode:
        raise UnavailableError(f"building {DELEGATE_SOURCE} failed: {r.stderr[-500:]}")
    return lib


def setup(opts: argparse.Namespace, out: Path, tmp: Path) -> None:
    """Before the daemon starts: the delegate, its control file, the update key; the daemon's config sections."""
    lib = build_delegate(tmp)
    opts.control = tmp / "control"
    set_control(opts.control, "ok")
    opts.key_path = tmp / "update.key"
    pub = bundle.keygen(str(opts.key_path))
    opts.other_key_path = tmp / "other.key"
    bundle.keygen(str(opts.other_key_path))
    opts.daemon_extra = {
        "state_dir": str(tmp / "state"),
        "pool": {"initial_mb": 0.5, "segment_mb": 0.5, "idle_release_s": 0.5},
        "accelerator": {"prefer": ["coral", "cpu"], "workers": opts.workers,
                        "coral": {"library": str(lib), "options": {"control": str(opts.control)}},
                        "health": {"failures": 2, "window_s": 8, "probe_s": 1, "probe_max_s": 2}},
        "sandbox": {"frame_timeout_s": 3, "heartbeat_s": 0.5, "backoff_max_s": 1},
        "model": {"selftest": {"interval_s": 0},
                  "update": {"enabled": True, "public_key": pub, "probation_s": 0, "max_mb": 4}},
    }


def set_control(path: Path, word: str) -> None:
    """The fake delegate's control word (it maps the file: rewrite in place, 64 bytes)."""
    with open(path, "r+b" if path.exists() else "wb") as fh:
        fh.write(word.encode().ljust(64, b"\0"))


# ---- the plan ----------------------------------------------------------------------------------
def plan(opts: argparse.Namespace) -> list[tuple[float, str]]:
    """Every planned fault, spread evenly over the time the frames need, in a shuffled order; each
    fail-over is followed by its fail-back."""
    c = opts.plan_counts
    kinds = [k for k in FAULT_KINDS if k != "failback" for _ in range(c[k])]
    random.Random(opts.seed + 2).shuffle(kinds)
    seq: list[str] = []
    for k in kinds:
        seq += [k, "failback"] if k == "failover" else [k]
    span = opts.est_s * 0.95
    return [(span * (i + 0.5) / len(seq), k) for i, k in enumerate(seq)]


# ---- frames ------------------------------------------------------------------------------------
class SiteFrames(soak.FrameSet):
    """soak.FrameSet's pictures, raw tensors and bad frames, in the site's mix, with known and hostile frames."""

    def __init__(self, seed: int, input_shape: list[int], input_dtype: str, bad_share: float) -> None:
        super().__init__(seed, input_shape, input_dtype, bad_share)
        self.known = SAMPLE.read_bytes()

    def pick_site(self, stream: str, burst: bool) -> tuple[bytes, bool, bool, str | None]:
        """(payload, is_bad, is_known, content_type) for the next frame of a stream (a MIX key)."""
        r = self.rng
        if r.random() < self.bad_share:
            return self._bad(), True, False, None
        mix = MIX[stream][1]
        kind = r.choices([k for _, k in mix], weights=[w for w, _ in mix])[0]
        if kind == "known":
            return self.known, False, True, "image/png" if r.random() < 0.3 else None
        if kind == "raw":
            return r.choice(self.raws), False, False, soak.CTYPES["raw"] if r.random() < 0.3 else None
        ctype = soak.CTYPES[kind.split(":")[0]] if r.random() < 0.3 else None
        return r.choice(self.images[kind]), False, False, ctype


frames = SiteFrames


def hostile(rng: random.Random, prefix: str) -> tuple[str | None, Callable[[Properties], None], bool]:
    """A hostile message's (stream override, properties, must_be_refused). Refused ones must be answered
    bad_request (door.py); the others are odd but valid, and must be answered as any frame."""
    kind = rng.choice(["long_stream", "big_correlation", "own_response_topic", "long_content_type",
                       "many_user_properties", "response_topic", "expiry"])
    if kind == "long_stream":
        return "s" * 200, lambda p: None, True

    def props(p: Properties) -> None:
        if kind == "big_correlation":
            p.CorrelationData = bytes(5000)
        elif kind == "own_response_topic":
            p.ResponseTopic = f"{prefix}/status"
        elif kind == "long_content_type":
            p.ContentType = "image/" + "x" * 300
        elif kind == "many_user_properties":
            p.UserProperty = [(f"k{i}", "v" * 100) for i in range(40)]  # paho appends them to frame_id
        elif kind == "response_topic":
            p.ResponseTopic = f"{prefix}/out/reply/site"
            p.CorrelationData = os.urandom(16)
        else:
            p.MessageExpiryInterval = 3600

    return None, props, kind in ("big_correlation", "own_response_topic", "long_content_type")


# ---- the load ----------------------------------------------------------------------------------
def phases(rng: random.Random, rate: float) -> Any:
    """steady (3-8 s) -> burst (1-2.5 s at 1.5x) -> idle (1.2-2.5 s, past pool.idle_release_s) -> steady ..."""
    t = 0.0
    while True:
        for kind, (d0, d1), r in (("steady", (3, 8), rate), ("burst", (1, 2.5), 1.5 * rate), ("idle", (1.2, 2.5), 0)):
            d = rng.uniform(d0, d1)
            yield soak.Phase(kind, t, t + d, r)
            t += d


def drive(opts: argparse.Namespace, ledger: soak.Ledger, link: soak.Mqtt, fs: SiteFrames, current: dict[str, Any],
          stop: soak.Stop, alive: Callable[[], str | None], faults: soak.Faults | None = None) -> str | None:
    """Send frames by the site's schedule until every planned frame is sent and the fault plan is done."""
    assert faults is not None
    ledger.known_label = SAMPLE_LABEL
    ledger.service_latency = True  # at a saturating rate, queue time measures the machine's other load
    target = opts.plan_counts["frames"]
    names = list(MIX)
    rng = random.Random(opts.seed + 1)
    gen = phases(random.Random(opts.seed), opts.rate)
    phase = next(gen)
    visitors: collections.deque[str] = collections.deque()
    n_visitors = 0
    # by frames sent, not by time: every planned name is made while frames flow (one made in an idle spell
    # or a broker outage, or after the last frame, would never be seen)
    visitor_every = max(1, target // opts.plan_counts["streams"])
    next_visitor = 0
    credit, last, next_check = 0.0, time.monotonic(), 0.0
    opts.streams_seen = set()
    while not stop.ev.is_set():
        now = time.monotonic()
        t = now - ledger.t0
        if t >= opts.duration_s or (ledger.sent >= target and faults.finished.is_set()):
            return None
        while t >= phase.end:
            phase = next(gen)
        rate = phase.rate if ledger.sent < target else min(phase.rate, 20.0)  # frames done: a trickle while faults end
        current.update(phase=phase.kind, rate=rate)
        if now >= next_check:
            next_check = now + 1.0
            died = alive()
            if died is not None:
                return died + " during the load"
        if ledger.sent >= next_visitor:  # stream names that come and go: three at a time, one every visitor_every
            next_visitor = ledger.sent + visitor_every
            n_visitors += 1
            visitors.append(f"visitor{n_visitors:05d}")
            if len(visitors) > 3:
                visitors.popleft()
        credit = min(credit + rate * (now - last), max(1.0, rate * 0.1))
        last = now
        if rate == 0:
            credit = 0.0
            stop.ev.wait(min(0.2, max(0.0, phase.end - t)))
            continue
        burst = phase.kind == "burst"
        if burst and faults.idle.is_set():  # p99 drift leaves bursts aside, and the second after (the queue draining)
            ledger.aside_until = max(ledger.aside_until, ledger.t0 + phase.end + 1.0)
        weights = [MIX[s][0] for s in names]
        if burst:
            weights[names.index("cam2")] = BURST_CAM2
        while credit >= 1 and not stop.ev.is_set():
            if not link.up or not ledger.wait_below(opts.max_outstanding, 0.05):
                credit = 0.0
                time.sleep(0.02)
                break
            mix = rng.choices(names, weights=weights)[0]
            stream = rng.choice(visitors) if mix == "visitor" else mix
            payload, bad, known, ctype = fs.pick_site(mix, burst)
            extra: Callable[[Properties], None] | None = None
            if rng.random() < opts.hostile_share:
                override, extra, refused = hostile(rng, link.prefix)
                stream, bad, known = override or stream, bad or refused, known and not refused
            opts.streams_seen.add(stream)
            seq = ledger.new_frame(stream, bad, known)
            ledger.published(seq, link.send(stream, payload, ledger.frame_id(seq), ctype, extra))
            credit -= 1
        stop.ev.wait(min(0.02, 1.0 / rate))
    return None


# ---- the faults soak.py does not have ----------------------------------------------------------
class StateWatch:
    """P/model/state (retained, from edged) as it arrives: the update results."""

    def __init__(self, host: str, port: int, prefix: str, run_id: str) -> None:
        self.states: list[dict[str, Any]] = []
        self.cv = threading.Condition()
        self.subscribed = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edged-soak-{run_id}-state",
                             protocol=mqtt.MQTTv5)
        self.c.reconnect_delay_set(1, 2)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{prefix}/model/state", qos=1)
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.on_message = self._on_message
        self.c.connect_async(host, port, keepalive=20)
        self.c.loop_start()
        if not self.subscribed.wait(20):
            raise UnavailableError(f"broker {host}:{port}: no subscription to {prefix}/model/state in 20 s")

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(body, dict):
            with self.cv:
                self.states.append(body)
                self.cv.notify_all()

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        with self.cv:
            found: list[dict[str, Any]] = []

            def match() -> bool:
                found[:] = [s for s in reversed(self.states) if pred(s)][:1]
                return bool(found)

            self.cv.wait_for(match, timeout)
            return found[0] if found else None

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def attach(opts: argparse.Namespace, faults: soak.Faults, ledger: soak.Ledger, host: str, port: int,
           prefix: str) -> None:
    assert isinstance(faults, SiteFaults)
    faults.opts = opts
    faults.gap_s = 1.0
    faults.prefix = prefix
    faults.watch = StateWatch(host, port, prefix, ledger.run_id)
    faults.update_results = collections.Counter()
    faults.ledger = ledger


class SiteFaults(soak.Faults):
    """soak.Faults plus accelerator fail-over/fail-back and model updates (applied, rejected, rolled back)."""

    prefix = ""
    watch: StateWatch | None = None
    serial = 0  # the highest serial published
    current = 0  # the serial serving
    words = ("crash", "hang", "fail_load")
    n_failover = 0
    n_rejected = 0
    update_results: collections.Counter[str] = collections.Counter()

    ledger: soak.Ledger | None = None

    def started(self, kind: str) -> None:
        if self.ledger is not None:  # a fault's results stay out of the p99 drift (it is judged per kind)
            self.ledger.aside_until = float("inf")

    def ended(self, kind: str) -> None:
        if self.ledger is not None:
            self.ledger.aside_until = time.monotonic() + 2.0

    def _accel(self, st: dict[str, Any]) -> tuple[str | None, list[str]]:
        acc = st.get("accelerator") or {}
        return acc.get("chosen"), [a.get("kind") for a in acc.get("set_aside") or []]

    def _failover(self) -> tuple[bool, str]:
        assert self.opts is not None
        word = self.words[self.n_failover % len(self.words)]
        self.n_failover += 1
        set_control(self.opts.control, word)
        # fail_load acts when a worker loads: a kill makes one (the fault is the load failure that follows)
        if word == "fail_load":
            ready = sorted(self._ready(self._status()))
            if ready:
                os.kill(ready[0], 9)
        ok = self._wait(lambda s: self._accel(s) == ("cpu", ["coral"]) and len(self._ready(s)) >= 1, 90)
        chosen, aside = self._accel(self._status())
        return ok, f"control {word!r}: serving on {chosen}, set aside {aside}"

    def _failback(self) -> tuple[bool, str]:
        assert self.opts is not None
        set_control(self.opts.control, "ok")
        ok = self._wait(lambda s: self._accel(s) == ("coral", []) and s.get("state") == "online"
                        and len(self._ready(s)) >= 1, 90)
        chosen, aside = self._accel(self._status())
        return ok, f"control 'ok': serving on {chosen}, set aside {aside}"

    def _publish(self, payload: bytes) -> dict[str, Any] | None:
        assert self.watch is not None
        digest = hashlib.sha256(payload).hexdigest()
        self.link.src.publish(f"{self.prefix}/model/update", payload, qos=1)
        return self.watch.wait(lambda s: (s.get("last_update") or {}).get("bundle") == digest, 120)

    def _bundle(self, serial: int, key_path: Path | None = None) -> bytes:
        assert self.opts is not None
        key = bundle.load_private_key(str(key_path or self.opts.key_path))
        # the same network in another file for each serial (a serving model offered again is a no-op):
        # the flatbuffer, 8-byte aligned, then the serial (a TFLite reader ignores bytes past the model)
        model = (soak.BUNDLED / "digits.tflite").read_bytes()
        model += bytes(-len(model) % 8) + serial.to_bytes(8, "little")
        return bundle.build(model, serial, key, name=f"digits-s{serial}",
                            labels=(soak.BUNDLED / "digits_labels.txt").read_bytes())

    def _apply(self) -> tuple[bool, str, int]:
        self.serial += 1
        st = self._publish(self._bundle(self.serial))
        lu = (st or {}).get("last_update") or {}
        cur = (st or {}).get("current") or {}
        ok = lu.get("result") == "applied" and cur.get("serial") == self.serial
        if ok:
            self.current = self.serial
        ok = ok and self._wait(lambda s: len(self._ready(s)) >= 1, 60)
        self.update_results[str(lu.get("result"))] += 1
        return ok, f"serial {self.serial}: {lu.get('result')} {lu.get('reason') or ''}".strip(), self.serial

    def _update(self) -> tuple[bool, str]:
        ok, detail, _ = self._apply()
        return ok, detail

    def _update_rejected(self) -> tuple[bool, str]:
        assert self.opts is not None
        i, self.n_rejected = self.n_rejected, self.n_rejected + 1
        good = self._bundle(self.serial + 1)
        cases: list[tuple[str, Callable[[], bytes]]] = [
            ("bad signature", lambda: good[:100] + bytes([good[100] ^ 0xFF]) + good[101:]),
            ("another key", lambda: self._bundle(self.serial + 1, self.opts.other_key_path)),  # type: ignore[union-attr]
            # an older bundle than the serving one (the serving one offered again is a no-op, not a replay)
            ("serial replayed", lambda: self._bundle(max(self.current - 1, 0))),
            ("truncated", lambda: good[: len(good) // 2]),
            ("random bytes as model", lambda: bundle.build(os.urandom(4096), self.serial + 1,
                                                           bundle.load_private_key(str(self.opts.key_path)),
                                                           name="noise")),  # type: ignore[union-attr]
            ("over max_mb", lambda: bundle.build(os.urandom(5 << 20), self.serial + 1,
                                                 bundle.load_private_key(str(self.opts.key_path)),
                                                 name="huge")),  # type: ignore[union-attr]
        ]
        what, make = cases[i % len(cases)]
        st = self._publish(make())
        lu = (st or {}).get("last_update") or {}
        cur = (st or {}).get("current") or {}
        ok = lu.get("result") == "rejected" and bool(lu.get("reason")) and cur.get("serial", 0) == self.current
        self.update_results[str(lu.get("result"))] += 1
        return ok, f"{what}: {lu.get('result')} ({lu.get('kind')}: {str(lu.get('reason'))[:80]})"

    def _update_rolled_back(self) -> tuple[bool, str]:
        before = self.current
        ok, detail, serial = self._apply()
        if not ok:
            return False, "the update before the rollback: " + detail
        answer = command(self.socket_path, "model-rollback", timeout=120)
        assert self.watch is not None
        st = self.watch.wait(lambda s: (s.get("last_update") or {}).get("result") == "rolled_back"
                             and (s.get("last_update") or {}).get("serial") == serial, 60)
        cur = (st or {}).get("current") or {}
        self.current = int(cur.get("serial") or 0)
        ok = bool(answer.get("ok")) and st is not None and self.current == before
        ok = ok and self._wait(lambda s: len(self._ready(s)) >= 1, 60)
        self.update_results["rolled_back" if ok else "rollback_failed"] += 1
        return ok, f"{detail}; rolled back to serial {cur.get('serial')} (serving {before} before it): {answer}"

    def close(self) -> None:
        super().close()
        if self.watch is not None:
            self.watch.close()


# ---- the count checks --------------------------------------------------------------------------
def checks(opts: argparse.Namespace, ledger: soak.Ledger, rows: list[dict[str, Any]], final: list[dict[str, Any]],
           faults: soak.Faults, extra: dict[str, Any]) -> list[soak.Check]:
    c = opts.plan_counts
    out: list[soak.Check] = []
    out.append(soak.Check("frames sent (planned)", ledger.sent, f">= {c['frames']}", ledger.sent >= c["frames"]))
    out.append(soak.Check("known frames answered right", ledger.known_ok, "> 0", ledger.known_ok > 0,
                          f"the digits sample answered {SAMPLE_LABEL!r}; any other top label is a wrong answer"))
    done = collections.Counter(f["kind"] for f in faults.done)
    rec = collections.Counter(f["kind"] for f in faults.done if f["ok"])
    for kind in FAULT_KINDS:
        out.append(soak.Check(f"fault {kind}: done/recovered", f"{done[kind]}/{rec[kind]}", f"{c[kind]}/{c[kind]}",
                              done[kind] == c[kind] == rec[kind]))
    grows = max((float(r["pool_grows"]) for r in rows if soak._num(r.get("pool_grows"))), default=0.0)
    shrinks = max((float(r["pool_shrinks"]) for r in rows if soak._num(r.get("pool_shrinks"))), default=0.0)
    cycles = int(min(grows, shrinks))
    out.append(soak.Check("pool grow/shrink cycles", cycles, f">= {c['pool_cycles']}", cycles >= c["pool_cycles"],
                          f"status pool counters: grows {grows:.0f}, shrinks {shrinks:.0f} "
                          "(a cycle: a segment grown and given back)"))
    seen = getattr(opts, "streams_seen", set())
    n_visitors = sum(1 for s in seen if s.startswith("visitor"))
    out.append(soak.Check("stream names that came and went", n_visitors, f">= {c['streams']}",
                          n_visitors >= c["streams"], f"{len(seen)} stream names in all"))
    extra["site72h"] = {"scale": opts.scale, "planned": c, "faults_done": dict(done), "faults_recovered": dict(rec),
                        "pool_grows": grows, "pool_shrinks": shrinks, "pool_cycles": cycles,
                        "update_results": dict(getattr(faults, "update_results", {})),
                        "streams": len(seen), "visitor_streams": n_visitors, "rate": opts.rate,
                        "known_ok": ledger.known_ok}
    return out

