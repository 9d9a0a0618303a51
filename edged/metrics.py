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


def write_prometheus(path: str, status: dict[str, Any]) -> None:
    """Write the status as Prometheus text for node_exporter's textfile collector (atomic rename)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    reg = CollectorRegistry()
    frames = Gauge("edged_frames", "frames since start, by kind", ["kind"], registry=reg)
    for k, v in status.get("frames", {}).items():
        frames.labels(k).set(v)
    lat = Gauge("edged_latency_ms", "latency percentiles per stage in ms", ["stage", "quantile"], registry=reg)
    for stage, s in status.get("stages_ms", {}).items():
        for q in ("p50", "p95", "p99"):
            lat.labels(stage, q).set(s.get(q, 0))
    pool = Gauge("edged_pool", "frame pool figures", ["figure"], registry=reg)
    for k in ("capacity_bytes", "used_bytes", "high_water_bytes", "fragmentation", "grows", "shrinks"):
        pool.labels(k).set(status.get("pool", {}).get(k, 0))
    Gauge("edged_queue_depth", "frames waiting for a worker", registry=reg).set(status.get("queue_depth", 0))
    Gauge("edged_mqtt_connected", "1 while connected to the broker", registry=reg).set(
        1 if status.get("mqtt", {}).get("connected") else 0)
    Gauge("edged_uptime_seconds", "seconds since start", registry=reg).set(status.get("uptime_s", 0))
    rss = Gauge("edged_rss_bytes", "resident memory", ["process"], registry=reg)
    rss.labels("supervisor").set(status.get("memory", {}).get("rss_bytes", 0))
    for w in status.get("workers", []):
        rss.labels(f"worker{w.get('index')}").set(w.get("rss_bytes") or 0)
    acc = status.get("accelerator", {})
    kinds = acc.get("kinds") or {}
    fails = Gauge("edged_accelerator_failures", "failures of each accelerator since start, by cause",
                  ["accelerator", "cause"], registry=reg)
    served = Gauge("edged_accelerator_frames", "frames served on each accelerator", ["accelerator"], registry=reg)
    inf = Gauge("edged_accelerator_inference_ms", "mean inference time on each accelerator", ["accelerator"],
                registry=reg)
    aside = Gauge("edged_accelerator_set_aside", "1 while the accelerator is set aside", ["accelerator"], registry=reg)
    for kind, k in kinds.items():
        for cause, n in (k.get("failures") or {}).items():
            fails.labels(kind, cause).set(n)
        served.labels(kind).set(k.get("frames") or 0)
        if k.get("inference_ms_mean") is not None:
            inf.labels(kind).set(k["inference_ms_mean"])
        aside.labels(kind).set(1 if k.get("state") == "set_aside" else 0)
    if acc.get("temperature_c") is not None:
        Gauge("edged_accelerator_temperature_celsius", "the Edge TPU's (else the SoC's hottest zone's) temperature",
              registry=reg).set(acc["temperature_c"])
    write_to_textfile(path, reg)
