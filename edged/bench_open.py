"""`edged bench`'s open-loop load: frames at a fixed rate, latency at 25/50/75/100 % of the measured capacity.

A closed window (a frame goes out when one comes back) never queues more
than the window, so it hides what a camera at a fixed frame rate sees. Here
frame i goes out at t0 + i/rate whatever came back, and its latency counts
from that scheduled time (a late send is the path's delay too, not hidden:
no coordinated omission). Capacity is the path's closed-window throughput of
the same run.
"""
from __future__ import annotations

import time
from typing import Any

from edged.benchpaths import Windowed

LOADS = (0.25, 0.5, 0.75, 1.0)


def _pct(lat: list[float], q: float) -> float:
    return round(lat[min(len(lat) - 1, int(q / 100 * len(lat)))], 3) if lat else 0.0


def open_loop(path: Windowed, rate: float, n: int) -> dict[str, Any]:
    """n frames through `path` at `rate` frames/s; p50/p95/p99 in ms from each frame's scheduled time."""
    base = path.next_seq
    path.next_seq += n
    with path.cv:
        path._nxt = path._end = base + n  # done() submits nothing: the schedule does
        path._left = n
    period = 1.0 / rate
    t0 = time.perf_counter() + 0.01
    for i in range(n):
        due = t0 + i * period
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        path.started[base + i] = due
        path.submit(base + i)
    limit = 30 + n * 0.1
    end = time.monotonic() + limit
    with path.cv:
        while path._left > 0:
            if path.dead:
                raise RuntimeError(f"bench path {path.name}: {path.dead} with {path._left} frame(s) unanswered")
            if time.monotonic() > end:
                raise RuntimeError(f"bench path {path.name}: {path._left} frame(s) unanswered after {limit:.0f} s")
            path.cv.wait(1)
    lat = sorted((path.finished[s] - path.started[s]) * 1e3 for s in range(base, base + n))
    span = max(path.finished[s] for s in range(base, base + n)) - t0
    return {"rate_fps": round(rate, 1), "frames": n, "achieved_fps": round(n / span, 1) if span > 0 else None,
            "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "p99_ms": _pct(lat, 99)}


def load_curve(path: Windowed, capacity_fps: float, seconds: float = 2.0, min_frames: int = 50) -> list[dict[str, Any]]:
    """open_loop at each of LOADS x capacity, `seconds` of frames (at least min_frames) each."""
    out = []
    for load in LOADS:
        rate = max(1.0, capacity_fps * load)
        row = open_loop(path, rate, max(min_frames, int(rate * seconds)))
        out.append({"load": load, **row})
    return out
