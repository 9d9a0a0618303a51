"""The frame pool under a real burst: grows, serves everything, gives memory back when idle."""
from __future__ import annotations

import io
import time

import numpy as np
import psutil
from PIL import Image

from conftest import shared, until


def _frames(n: int) -> list[bytes]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        w, h = int(rng.integers(64, 1281)), int(rng.integers(64, 961))
        # smooth content (a gradient plus noise) compresses like camera frames do
        base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] + rng.normal(0, 20, (h, w, 3))
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG" if i % 2 else "PNG")
        out.append(buf.getvalue())
    return out


def test_pool_burst_of_mixed_frames_served_grows_then_shrinks_and_rss_returns(daemon_factory, client_factory):
    d = daemon_factory({"model": {"path": str(shared("mobilenet_v1_0.25_128_quant.tflite")),
                                  "labels": str(shared("imagenet_labels.txt")), "task": "classify"}})
    frames = _frames(40)
    c = client_factory(d.prefix)
    # warm the path once so the baseline includes what a served frame leaves behind for good
    c.send(frames[0], "warm")
    assert c.wait(["warm"], 20)["warm"]
    p0 = d.status()["pool"]  # before the baseline: the status path warmed too
    supervisor = psutil.Process(d.proc.pid)
    rss0 = supervisor.memory_info().rss
    ids = []
    for rep in range(5):
        for i, f in enumerate(frames):
            fid = f"b{rep}-{i}"
            ids.append(fid)
            c.send(f, fid)
    got = c.wait(ids, 120)
    assert all(v is not None for v in got.values())
    assert not [v for v in got.values() if "error" in v], [v["error"] for v in got.values() if "error" in v][:3]
    p1 = d.status()["pool"]
    assert p1["grows"] > p0["grows"] and p1["high_water_bytes"] > p0["capacity_bytes"], (p0, p1)
    # every frame answered: each block is back (freed before its result goes out) and coalesced, so the only
    # fragmentation left is the free space split over segments: at most 1 - 1/segments
    assert p1["used_bytes"] == 0 and p1["live_blocks"] == 0, p1
    assert p1["fragmentation"] <= 1 - 1 / p1["segments"] + 1e-4, p1
    t0 = time.monotonic()
    last = [p1]

    def shrunk() -> bool:
        last[0] = d.status()["pool"]
        return last[0]["shrinks"] > p1["shrinks"] and last[0]["capacity_bytes"] == p0["capacity_bytes"]

    until(shrunk, 30, "the pool back to its first capacity", 0.5, detail=lambda: str(last[0]))
    p2 = last[0]
    t_shrink = time.monotonic() - t0
    rss = [rss0]

    def rss_back() -> bool:
        rss[0] = supervisor.memory_info().rss
        return rss[0] <= rss0 * 1.10

    until(rss_back, 15, "the supervisor's RSS back within 10% of its baseline", 0.5,
          detail=lambda: f"supervisor RSS {rss[0] >> 20} MiB vs {rss0 >> 20} MiB before the burst")
    print(f"pool burst: {len(ids)} frames; capacity {p0['capacity_bytes'] / 2**20:.1f} MiB -> high water "
          f"{p1['high_water_bytes'] / 2**20:.1f} MiB ({p1['grows'] - p0['grows']} grows), back to "
          f"{p2['capacity_bytes'] / 2**20:.1f} MiB {t_shrink:.1f} s after the burst was answered; "
          f"supervisor RSS {rss0 / 2**20:.1f} MiB before, {rss[0] / 2**20:.1f} MiB after")
