"""Counters and latency histograms for status, P/stats and Prometheus text.

Histograms use fixed log-spaced buckets (0.05 ms .. ~100 s, 10% apart), so
memory stays constant over months and percentiles are within 10%. Each also
counts into the coarse buckets of LE_MS, exactly (no rounding to the log
buckets): those are the `le` buckets of the Prometheus histograms.
"""
from __future__ import annotations

import bisect
import math
import threading
from typing import Any

STAGES = ("queue", "preprocess", "inference", "publish", "total")
_BOUNDS = [0.05 * 1.1**i for i in range(int(math.log(2e6) / math.log(1.1)) + 1)]  # ms
# Prometheus `le` bounds in ms (0.5 ms .. 30 s): per-stage latencies of an edge device
LE_MS = (0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)


class Histogram:
    """Counts of observations per log bucket; percentiles from the bucket bounds."""

    def __init__(self) -> None:
        self.counts = [0] * (len(_BOUNDS) + 1)
        self.le = [0] * (len(LE_MS) + 1)  # the last one: above LE_MS[-1]
        self.n = 0
        self.total = 0.0

    def observe(self, ms: float) -> None:
        self.counts[bisect.bisect_left(_BOUNDS, ms)] += 1
        self.le[bisect.bisect_left(LE_MS, ms)] += 1  # bisect_left: a value equal to a bound is "le" it
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

    def buckets(self) -> dict[str, Any]:
        """Cumulative counts per LE_MS bound ("+Inf": all) and the sum, for Prometheus histograms."""
        out: dict[str, int] = {}
        seen = 0
        for bound, c in zip(LE_MS, self.le, strict=False):
            seen += c
            out[f"{bound:g}"] = seen
        out["+Inf"] = self.n
        return {"sum_ms": round(self.total, 3), "le_ms": out}


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
                    "stages_ms": {s: {**h.summary(), **h.buckets()} for s, h in self.hist.items()}}


def write_prometheus(path: str, status: dict[str, Any]) -> None:
    """Write the status as Prometheus text for node_exporter's textfile collector (atomic rename)."""
    from edged.prometheus import write_textfile

    write_textfile(path, status)
