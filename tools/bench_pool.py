#!/usr/bin/env python3
"""Benchmark of edged.pool.FramePool on a long random workload of realistic frame sizes.

Runs --ops alloc/free operations (default 1,000,000) on a memfd-backed pool with at most
--live frames in flight, freed out of order. Sizes mix 20 KB ESP32 JPEGs, 100-300 KB JPEGs,
1-6 MB PNGs and raw tensors of 150528, 49152 and 270000 bytes. Time is simulated (--rate
frames per second) so that idle release and recycling happen; maintain() runs once per
simulated second. Every alloc/free call is timed. One frame in --copy-every gets its payload
copied into its block (through pool.view, the one copy pool.write makes) timed against bytes(payload),
a plain copy of the same size, in the same run; that bytes copy stays alive as long as its
frame, as it would in a daemon that copied frames instead of pooling them (a copy freed at
once would reuse one cache-hot malloc chunk and flatter the baseline). With --copy-every 1
every frame is copied; a larger N keeps long runs short while the bookkeeping covers all ops.

    python tools/bench_pool.py [--ops N] [--live 16] [--copy-every 1] [--json]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edged.pool import FramePool

KB, MiB = 1000, 1 << 20
# (weight, low, high) in bytes: what cameras and preprocessors send an edge daemon
MIX = [(30, 15 * KB, 25 * KB),          # ESP32-CAM JPEG
       (25, 100 * KB, 300 * KB),        # VGA..HD JPEG
       (5, 1 * MiB, 6 * MiB),           # PNG
       (15, 150528, 150528),            # 224x224x3 uint8 tensor
       (15, 49152, 49152),              # 128x128x3 uint8 tensor
       (10, 270000, 270000)]            # 300x300x3 uint8 tensor


def frame_size(rng: random.Random) -> int:
    _, lo, hi = rng.choices(MIX, weights=[m[0] for m in MIX])[0]
    return lo if lo == hi else rng.randint(lo, hi)


def run(ops: int, live_max: int, copy_every: int, rate: float, seed: int) -> dict:
    rng = random.Random(seed)
    clock = [0.0]
    payload = memoryview(bytes(rng.getrandbits(8) for _ in range(4096)) * (6 * MiB // 4096 + 1))
    pool = FramePool(initial_bytes=4 * MiB, max_bytes=256 * MiB, segment_bytes=4 * MiB,
                     idle_release_s=10.0, frag_window_s=10.0, clock=lambda: clock[0])
    live: list = []
    alloc_ns = free_ns = copy_ns = bytes_ns = bytes_free_ns = copied = sampled = 0
    allocs = frees = failed = 0
    frag_sum, frag_max, frag_n, cap_sum = 0.0, 0.0, 0, 0
    next_maintain = 1.0
    pc = time.perf_counter_ns
    t_start = time.perf_counter()
    with pool:
        for i in range(ops):
            if live and (len(live) >= live_max or rng.random() < 0.5):
                b, dup = live.pop(rng.randrange(len(live)))   # the bytes twin dies with its frame
                t0 = pc()
                pool.free(b)
                t1 = pc()
                del dup
                t2 = pc()
                free_ns, bytes_free_ns = free_ns + t1 - t0, bytes_free_ns + t2 - t1
                frees += 1
            else:
                n = frame_size(rng)
                allocs += 1
                t0 = pc()
                b = pool.alloc(n)
                alloc_ns += pc() - t0
                dup = None
                if b is None:
                    failed += 1
                    continue
                if allocs % copy_every == 0:
                    src = payload[:n]
                    with pool.view(b) as mv:
                        if allocs & 1:             # take turns going first: the second finds src cached
                            t0 = pc()
                            mv[:] = src
                            t1 = pc()
                            dup = bytes(src)
                            t2 = pc()
                            copy_ns, bytes_ns = copy_ns + t1 - t0, bytes_ns + t2 - t1
                        else:
                            t0 = pc()
                            dup = bytes(src)
                            t1 = pc()
                            mv[:] = src
                            t2 = pc()
                            copy_ns, bytes_ns = copy_ns + t2 - t1, bytes_ns + t1 - t0
                    copied += n
                    sampled += 1
                live.append((b, dup))
                clock[0] += 1.0 / rate   # one more frame arrived
            if i % 100 == 0:
                s = pool.stats()
                frag, cap_sum = s["fragmentation"], cap_sum + s["capacity_bytes"]
                frag_sum, frag_max, frag_n = frag_sum + frag, max(frag_max, frag), frag_n + 1
            if clock[0] >= next_maintain:
                pool.maintain()
                next_maintain += 1.0
        for b, _dup in live:
            pool.free(b)
        st = pool.stats()
    wall = time.perf_counter() - t_start
    per_alloc, per_free = alloc_ns / max(allocs, 1), free_ns / max(frees, 1)
    per_copy, per_bytes = copy_ns / max(sampled, 1), bytes_ns / max(sampled, 1)
    per_bytes_free = bytes_free_ns / max(sampled, 1)  # frees of frames without a copy drop None
    return {
        "ops": ops, "allocs": allocs, "frees": frees, "failed_allocs": failed, "live_max": live_max,
        "alloc_ns_mean": round(per_alloc), "free_ns_mean": round(per_free),
        "alloc_free_ns_mean": round(per_alloc + per_free),
        "copy_sample": f"1 frame in {copy_every} copied ({sampled} frames, {copied / MiB:.0f} MiB)",
        "copy_ns_mean": round(per_copy), "bytes_copy_ns_mean": round(per_bytes),
        "copy_gib_s": round(copied / (copy_ns or 1) * 1e9 / 2**30, 2),
        "bytes_copy_gib_s": round(copied / (bytes_ns or 1) * 1e9 / 2**30, 2),
        "copy_vs_bytes_ratio": round(per_copy / (per_bytes or 1), 3),
        "frame_vs_bytes_ratio": round((per_alloc + per_copy + per_free) / ((per_bytes + per_bytes_free) or 1), 3),
        "fragmentation_mean": round(frag_sum / max(frag_n, 1), 4), "fragmentation_max": frag_max,
        "grows": st["grows"], "shrinks": st["shrinks"], "recycles": st["recycles"],
        "mean_capacity_bytes": cap_sum // max(frag_n, 1), "final_capacity_bytes": st["capacity_bytes"],
        "high_water_bytes": st["high_water_bytes"],
        "simulated_s": round(clock[0], 1), "wall_s": round(wall, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=1_000_000, help="alloc+free operations (default 1,000,000)")
    ap.add_argument("--live", type=int, default=16, help="most frames in flight (default 16)")
    ap.add_argument("--copy-every", type=int, default=1, help="copy the payload of 1 frame in N (default 1: all)")
    ap.add_argument("--rate", type=float, default=200.0, help="simulated frames per second (default 200)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    r = run(a.ops, a.live, max(a.copy_every, 1), a.rate, a.seed)
    if a.json:
        print(json.dumps(r))
        return 0
    print(f"FramePool, {r['ops']:,} ops ({r['allocs']:,} allocs, {r['frees']:,} frees), <= {r['live_max']} live, "
          f"{r['simulated_s']:.0f} s simulated, {r['wall_s']:.1f} s wall")
    print(f"  alloc {r['alloc_ns_mean']} ns + free {r['free_ns_mean']} ns = {r['alloc_free_ns_mean']} ns per frame"
          f"; failed allocs {r['failed_allocs']}")
    print(f"  copy sample: {r['copy_sample']}" + ("" if a.copy_every <= 1 else "; bookkeeping covers every op"))
    print(f"  copy into block {r['copy_ns_mean']} ns ({r['copy_gib_s']} GiB/s) vs bytes(payload) "
          f"{r['bytes_copy_ns_mean']} ns ({r['bytes_copy_gib_s']} GiB/s): copy ratio {r['copy_vs_bytes_ratio']}, "
          f"alloc+copy+free vs bytes()+drop ratio {r['frame_vs_bytes_ratio']}")
    print(f"  fragmentation mean {r['fragmentation_mean']} max {r['fragmentation_max']}; grows {r['grows']}, "
          f"shrinks {r['shrinks']}, recycles {r['recycles']}; capacity mean "
          f"{r['mean_capacity_bytes'] / MiB:.1f} MiB, final {r['final_capacity_bytes'] / MiB:.0f} MiB; "
          f"high water {r['high_water_bytes'] / MiB:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
