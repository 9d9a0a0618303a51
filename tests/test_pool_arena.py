"""tools/bench_pool_arena.py on a short trace: a fixed arena and edged's pool replay the same frames.

What holds and is asserted: the trace drives the fixed arena to refusals; the pool refuses only once
it has grown to its cap (never while it could still add a segment); at rest the pool is back at its
1 MiB base in capacity and in resident pool pages, while the fixed arena keeps every page it ever
touched. What does not hold on this trace, so nothing asserts it: that the pool refuses fewer frames
(README, "The pool against a fixed arena").
"""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))

import bench_pool_arena as arena

MiB = 1 << 20


def test_make_trace_same_seed_gives_same_frames_at_same_times():
    a = arena.make_trace(5, 6, 256 * MiB, 50)
    b = arena.make_trace(5, 6, 256 * MiB, 50)
    c = arena.make_trace(6, 6, 256 * MiB, 50)
    assert (a.t, a.fid, a.size) == (b.t, b.fid, b.size) and a.cycle_start == b.cycle_start
    assert (a.t, a.size) != (c.t, c.size)
    allocs = [f for f, n in zip(a.fid, a.size) if n]
    frees = [f for f, n in zip(a.fid, a.size) if not n]
    assert sorted(allocs) == sorted(frees) == list(range(len(allocs)))  # every frame allocated once, freed once
    at = {(f, n > 0): i for i, (f, n) in enumerate(zip(a.fid, a.size))}
    assert all(at[(f, True)] < at[(f, False)] for f in allocs)   # no frame freed before it is allocated


def test_bench_pool_arena_short_trace_fixed_refuses_pool_only_at_cap_and_rests_at_base(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_pool_arena.py"), "--cycles", "40",
                        "--out", str(tmp_path), "--no-plot"], check=False, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    fixed, pool, cap = s["fixed"], s["pool"], s["cap_mb"]
    assert s["frames"] > 20_000, s
    # the trace is adversarial enough: the fixed arena of the same cap refuses frames
    assert fixed["refused"] > 0 and fixed["first_refusing_cycle"] is not None, fixed
    # the pool refuses a frame only when the room left under the cap cannot hold a segment for it
    assert pool["refused_with_room_for_it"] == 0 and fixed["refused_with_room_for_it"] == 0, (pool, fixed)
    if pool["refused"]:
        assert pool["capacity_mb_at_refusal_min"] > cap - 6, pool   # frames of the mix are at most 6 MB
    # at rest after the trace: the pool is its base segment again, in capacity and in resident pages;
    # the fixed arena still holds (nearly) every page of its cap
    assert pool["final_rest_capacity_mb"] == 1.0, pool
    assert pool["final_rest_shmem_mb"] <= 1.5, pool
    assert fixed["final_rest_shmem_mb"] >= 0.9 * cap, fixed
    assert pool["capacity_mb_mean"] < fixed["capacity_mb_mean"], (pool, fixed)
    rows = (tmp_path / "samples.csv").read_text().splitlines()
    assert rows[0].startswith("arena,t_s,capacity_mb") and len(rows) > 2 * 500
