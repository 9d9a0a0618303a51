"""Accelerator health: failures per accelerator, setting one aside, the probe schedule, telemetry.

Pure bookkeeping, no processes: edged.supervision reports each failure of an
accelerator (a worker crashed or hung on it, the model did not load on it, its
self-test answered wrong) and asks which kind workers should start on. Past
`accelerator.health.failures` failures within `window_s` a kind is set aside
(the last kind of `accelerator.prefer` still serving never is: with nothing to
fail over to, its failures go to the restart limit, and past that the daemon
exits 70). A set-aside kind is probed after `probe_s`, then twice as long each
time a probe fails, up to `probe_max_s`. A kind that did not load when the
daemon started was never serving here: it is "skipped", not set aside, and not
probed.

Also here: per-accelerator counters (failures by cause, frames and inference
time of the workers that served on it) and the accelerator's temperature.
"""
from __future__ import annotations

import collections
import glob
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from edged.config import HealthConfig

logger = logging.getLogger(__name__)

CAUSES = ("crash", "hang", "load", "selftest")
TEMP_TTL_S = 5.0


@dataclass
class SetAside:
    kind: str
    reason: str
    since: float  # wall clock, for status
    since_mono: float
    interval: float  # the current probe interval
    next_probe: float  # monotonic
    probes: int = 0


@dataclass
class KindStats:
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CAUSES, 0))
    frames: int = 0
    inference_ms: float = 0.0
    set_aside: int = 0
    restored: int = 0


class Health:
    """Which accelerator kinds may serve; not thread-safe on its own (the supervisor's lock guards it)."""

    def __init__(self, prefer: tuple[str, ...], cfg: HealthConfig) -> None:
        self.prefer = tuple(prefer)
        self.cfg = cfg
        self.recent: dict[str, collections.deque[float]] = {k: collections.deque() for k in self.prefer}
        self.aside: dict[str, SetAside] = {}
        self.skipped: dict[str, str] = {}  # did not load at start: never served here, not probed
        self.stats: dict[str, KindStats] = {k: KindStats() for k in self.prefer}
        self._temp: tuple[float, float | None] = (-math.inf, None)  # (when read, value): read at most every TEMP_TTL_S

    # ---- which kind --------------------------------------------------------------------------------------------
    def candidates(self) -> list[str]:
        """The kinds workers may start on now, best first."""
        return [k for k in self.prefer if k not in self.aside and k not in self.skipped]

    def current(self) -> str | None:
        c = self.candidates()
        return c[0] if c else None

    def preferred_over(self, kind: str | None) -> list[str]:
        """Set-aside kinds that rank above `kind` in prefer (the ones worth probing)."""
        rank = self.prefer.index(kind) if kind in self.prefer else len(self.prefer)
        return [k for k in self.prefer[:rank] if k in self.aside]

    def degraded_reason(self) -> str | None:
        if not self.aside:
            return None
        return "; ".join(f"{a.kind} set aside: {a.reason}" for a in self.aside.values())

    # ---- events --------------------------------------------------------------------------------------------
    def skip(self, kind: str, reason: str) -> None:
        if kind in self.recent:
            self.skipped[kind] = reason

    def failure(self, kind: str | None, cause: str, detail: str, now: float | None = None) -> SetAside | None:
        """Count one failure of `kind`; the SetAside when this one sets it aside, else None."""
        if kind not in self.recent or kind in self.aside:
            return None
        now = time.monotonic() if now is None else now
        self.stats[kind].failures[cause] = self.stats[kind].failures.get(cause, 0) + 1
        q = self.recent[kind]
        q.append(now)
        while q and now - q[0] > self.cfg.window_s:
            q.popleft()
        if len(q) < self.cfg.failures:
            return None
        if self.candidates() == [kind]:
            return None  # nothing to fail over to: the restart limit decides (exit 70)
        return self.set_aside(kind, f"{len(q)} failures in {self.cfg.window_s:g} s, the last: {cause}: {detail}", now)

    def set_aside(self, kind: str, reason: str, now: float | None = None) -> SetAside:
        now = time.monotonic() if now is None else now
        a = SetAside(kind, reason[:500], time.time(), now, self.cfg.probe_s, now + self.cfg.probe_s)
        self.aside[kind] = a
        self.recent[kind].clear()
        self.stats[kind].set_aside += 1
        return a

    def due(self, now: float) -> list[SetAside]:
        return [a for a in self.aside.values() if a.next_probe <= now]

    def probe_failed(self, kind: str, now: float | None = None) -> SetAside | None:
        a = self.aside.get(kind)
        if a is None:
            return None
        now = time.monotonic() if now is None else now
        a.probes += 1
        a.interval = min(self.cfg.probe_max_s, a.interval * 2)
        a.next_probe = now + a.interval
        return a

    def restore(self, kind: str) -> SetAside | None:
        a = self.aside.pop(kind, None)
        if a is not None:
            self.stats[kind].restored += 1
            self.recent[kind].clear()
        return a

    def served(self, kind: str | None, frames: int, inference_ms: float) -> None:
        """A worker that served on `kind` ended: keep what it did in the kind's totals."""
        st = self.stats.get(kind or "")
        if st is not None:
            st.frames += frames
            st.inference_ms += inference_ms

    # ---- status --------------------------------------------------------------------------------------------
    def report(self, live: dict[str, tuple[int, float]], now: float | None = None) -> dict[str, Any]:
        """accelerator.set_aside, .temperature_c and .kinds; `live` adds the serving workers' frames and ms per kind."""
        now = time.monotonic() if now is None else now
        kinds = {}
        for k, st in self.stats.items():
            frames, ms = live.get(k, (0, 0.0))
            frames += st.frames
            ms += st.inference_ms
            kinds[k] = {"state": "set_aside" if k in self.aside else "skipped" if k in self.skipped else "ok",
                        "failures": dict(st.failures), "frames": frames,
                        "inference_ms_mean": round(ms / frames, 3) if frames else None,
                        "set_aside_count": st.set_aside, "restored_count": st.restored}
        return {"set_aside": [{"kind": a.kind, "reason": a.reason, "since": round(a.since, 3),
                               "next_probe_s": round(max(0.0, a.next_probe - now), 1)} for a in self.aside.values()],
                "temperature_c": self.temperature(now), "kinds": kinds}

    def temperature(self, now: float) -> float | None:
        """temperature_c(), read at most every TEMP_TTL_S (a sensor behind i2c can take milliseconds)."""
        if now - self._temp[0] >= TEMP_TTL_S:
            self._temp = (now, temperature_c())
        return self._temp[1]


# ---- temperature ---------------------------------------------------------------------------------------------------
APEX_GLOB = "/sys/class/apex/apex_*/temp"  # the Edge TPU PCIe driver (gasket/apex): millidegrees
THERMAL_GLOB = "/sys/class/thermal/thermal_zone*/temp"  # the SoC's zones: millidegrees


def temperature_c(apex: str = APEX_GLOB, thermal: str = THERMAL_GLOB) -> float | None:
    """The Edge TPU's temperature where its driver exposes one, else the hottest SoC thermal zone, else None."""
    for pattern in (apex, thermal):
        vals = []
        for path in sorted(glob.glob(pattern))[:64]:
            try:
                with open(path, encoding="ascii") as fh:
                    raw = fh.read(32).strip()
                milli = int(raw)
            except (OSError, ValueError):
                continue
            if -50_000 <= milli <= 200_000:  # a value outside this is a driver's placeholder, not a reading
                vals.append(milli / 1000.0)
        if vals:
            return round(max(vals), 1)
    return None
