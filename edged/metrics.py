"""Counters and latency histograms for status, P/stats and Prometheus text.

Histograms use fixed log-spaced buckets (0.05 ms .. ~100 s, 10% apart), so
memory stays constant over months and percentiles are within 10%.
"""
from __future__ import annotations

import bisect
import math
import threading
from typing import Any

STAGES = ("queue", "preprocess", "inference", "publish", "total")
_BOUNDS = [0.05 * 1.1**i for i in range(int(math.log(2e6) / math.log(1.1)) + 1)]  # ms


class Histogram:
    """Counts of observations per log bucket; percentiles from the bucket bounds."""

    def __init__(self) -> None:
        self.counts = [0] * (len(_BOUNDS) + 1)
        self.n = 0
        self.total = 0.0

    def observe(self, ms: float) -> None:
        self.counts[bisect.bisect_left(_BOUNDS, ms)] += 1
        self.n += 1
        self.total += ms

    def percentile(self, q: float) -> float:
        if not self.n:
            return 0.0
        rank = max(1, math.ceil(q / 100 * self.n))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return round(_BOUNDS[min(i, len(_BOUNDS) - 1)], 3)
        return round(_BOUNDS[-1], 3)

    def summary(self) -> dict[str, float]:
        return {"p50": self.percentile(50), "p95": self.percentile(95), "p99": self.percentile(99),
                "mean": round(self.total / self.n, 3) if self.n else 0.0, "count": self.n}


class Metrics:
    """Thread-safe frame counters and one histogram per stage."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.frames = {"received": 0, "completed": 0, "errors": 0, "dropped": 0, "too_large": 0, "expired": 0}
        self.error_codes: dict[str, int] = {}
        self.hist = {s: Histogram() for s in STAGES}

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.frames[key] = self.frames.get(key, 0) + n

    def error(self, code: str) -> None:
        with self.lock:
            self.frames["errors"] += 1
            self.error_codes[code] = self.error_codes.get(code, 0) + 1

    def observe(self, timings: dict[str, float]) -> None:
        with self.lock:
            self.frames["completed"] += 1
            for stage, ms in timings.items():
                h = self.hist.get(stage)
                if h is not None:
                    h.observe(ms)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"frames": dict(self.frames), "errors_by_code": dict(self.error_codes),
                    "latency_ms": self.hist["total"].summary(),
                    "stages_ms": {s: h.summary() for s, h in self.hist.items()}}


def prometheus_text(status: dict[str, Any]) -> str:
    """The status as Prometheus exposition text (for node_exporter's textfile collector)."""
    lines = []

    def g(name: str, value: Any, help_: str, labels: str = "") -> None:
        lines.append(f"# HELP edged_{name} {help_}")
        lines.append(f"# TYPE edged_{name} gauge")
        lines.append(f"edged_{name}{labels} {float(value)}")

    for k, v in status.get("frames", {}).items():
        g(f"frames_{k}", v, f"frames {k} since start")
    for stage, s in status.get("stages_ms", {}).items():
        for q in ("p50", "p95", "p99"):
            g(f"latency_{stage}_{q}_ms", s.get(q, 0), f"{stage} latency {q} in ms")
    pool = status.get("pool", {})
    for k in ("capacity_bytes", "used_bytes", "high_water_bytes", "fragmentation"):
        if k in pool:
            g(f"pool_{k}", pool[k], f"frame pool {k}")
    g("queue_depth", status.get("queue_depth", 0), "frames waiting for a worker")
    g("mqtt_connected", 1 if status.get("mqtt", {}).get("connected") else 0, "1 while connected to the broker")
    g("uptime_seconds", status.get("uptime_s", 0), "seconds since start")
    return "\n".join(lines) + "\n"
