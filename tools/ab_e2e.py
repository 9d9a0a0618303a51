"""A/B of the end-to-end path of two edged checkouts, in one run, rounds interleaved.

    .venv/bin/python tools/ab_e2e.py -c bench.yaml OLD_TREE NEW_TREE [--rounds 10] [--frames 1000]

Each tree serves through its own Mosquitto and `edged run` (started with the
tree as working directory, so `python -m edged` runs that tree's code), the
publisher/subscriber is this checkout's bench client. Rounds alternate
A,B / B,A with a raw invoke loop between them, so host noise (on a shared
2-core VM, ±10 % from one minute to the next) hits both alike. Prints the
medians and the per-round B/A ratios of wall time and supervisor CPU per
frame: a change is real when the per-round ratios agree, not when one
median moved.

Make OLD_TREE with `git worktree add /tmp/base <commit>`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edged import bench, benchpaths, config, runtime
from edged.bench_e2e import E2EPath


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("trees", nargs=2, metavar="TREE")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--frames", type=int, default=1000, help="frames per path per round")
    ap.add_argument("--window", type=int, default=2, help="frames in flight")
    args = ap.parse_args()
    cfg = config.load(args.config)
    m = runtime.Model(cfg.model.path, threads=cfg.model.threads)
    payload = np.random.default_rng(0).integers(0, 255, size=m.input.shape).astype(m.input.dtype).tobytes()
    del m
    raw = bench.raw_path(cfg, payload)
    here = os.getcwd()
    paths = []
    try:
        for tree in args.trees:
            os.chdir(tree)
            paths.append(E2EPath(cfg, payload, window=args.window))
    finally:
        os.chdir(here)
    res = [{"wall": [], "sup": [], "worker": []} for _ in paths]
    raw_ms: list[float] = []
    try:
        for p in paths:
            p.measure(300)
        raw.measure(300, benchpaths.Stats("warm-up"))
        for r in range(args.rounds):
            rs = benchpaths.Stats("raw")
            raw.measure(args.frames, rs)
            raw_ms.append(rs.wall_s / rs.frames * 1e3)
            for i in ([0, 1] if r % 2 == 0 else [1, 0]):
                p = paths[i]
                worker = p.pids[3]
                s0, w0, t0 = cpu_s(p.daemon.pid), cpu_s(worker), time.perf_counter()
                p.measure(args.frames)
                res[i]["wall"].append((time.perf_counter() - t0) / args.frames * 1e3)
                res[i]["sup"].append((cpu_s(p.daemon.pid) - s0) / args.frames * 1e3)
                res[i]["worker"].append((cpu_s(worker) - w0) / args.frames * 1e3)
    finally:
        for p in paths:
            p.close()
    med = statistics.median
    print(f"raw invoke loop: median {med(raw_ms):.3f} ms/frame")
    for tree, r in zip(args.trees, res, strict=False):
        print(f"{tree}: e2e {med(r['wall']):.3f} ms/frame (added {med(r['wall']) - med(raw_ms):.3f}), "
              f"supervisor CPU {med(r['sup']):.3f} ms/frame, worker CPU {med(r['worker']):.3f} ms/frame")
    a, b = res
    print("per round B/A, e2e wall:     ", " ".join(f"{y / x:.2f}" for x, y in zip(a["wall"], b["wall"], strict=False)))
    print("per round B/A, supervisor CPU:", " ".join(f"{y / x:.2f}" for x, y in zip(a["sup"], b["sup"], strict=False)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
