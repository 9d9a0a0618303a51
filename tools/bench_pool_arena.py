#!/usr/bin/env python3
"""The pool claim side by side: one adversarial allocation trace against a fixed arena and edged's pool.

    .venv/bin/python tools/bench_pool_arena.py                # 72 simulated hours; docs/pool-arena.png
    .venv/bin/python tools/bench_pool_arena.py --cycles 300 --out /tmp/pa --no-plot
    .venv/bin/python tools/bench_pool_arena.py --sweep --cycles 150   # the direction over pin rates and peaks

The same seeded trace is replayed, in simulated time, against
  (a) fixed: FramePool(initial_bytes=cap, max_bytes=cap, segment_bytes=cap): edged's own best-fit,
      coalescing allocator and memfd backing, in one segment the size of the cap. There is nothing to
      grow into, the base segment is never released, and recycling needs two segments, so it never
      resizes or recycles. The same allocator, so that the comparison isolates what growth, idle release
      and recycling do;
  (b) pool: FramePool as edged's daemon builds it from configs/edged.yaml's defaults (1 MiB base,
      4 MiB segments, idle release after 10 s, recycling above 0.5 fragmentation for 10 s), same cap.
Each replays in a child process of its own, so its RSS is its own; maintain() runs once per simulated
second, as the daemon's upkeep does; every admitted frame's payload is copied into its block
(pool.write: the daemon's one copy), so the pages a frame touches are really resident.

The trace (drawn from --seed; both replays see the same frames at the same simulated times) is a
sequence of cycles, each a burst and an idle spell:
  - burst (15-60 s): frames arrive (Poisson) faster than one Pi-class worker serves them (50 ms plus
    1 ms per 20 kB, FIFO), so the queue, and the pool, fill to a peak of a share of the cap drawn from
    --peak (default 30-80%), then drain; sizes are tools/bench_pool.py's mix per frame (15-25 kB ESP32
    JPEGs, 100-300 kB JPEGs, 1-6 MB PNGs, raw tensors of 49152, 150528 and 270000 bytes);
  - pinned: one frame in --pin-every (default 50) is held for 2-12 more cycles (a stalled stream, a
    consumer that keeps its frame) and freed at a random moment of a later cycle, burst or idle spell:
    long-lived blocks scattered through the space of short-lived ones, what fragments an arena;
  - idle (20-120 s): no arrivals, longer than idle_release_s.
A frame that an arena cannot place is refused (edged answers such a frame "overloaded": frame pool is
full); its free is skipped and the trace goes on unchanged. After the last cycle every frame is freed
and both rest for 60 simulated seconds.

Reported per arena (samples.csv: one row per --sample-s simulated seconds; summary.json): capacity;
used; fragmentation (1 - largest free extent / free bytes, the pool's own figure); the largest frame
it could place now (largest free extent; for the pool also the room under the cap for a new
segment); refusals, per cycle, with the frame size, capacity and used bytes at each; resident memory
(RssShmem from /proc/self/status: the memfd pages; VmRSS: the whole process, trace included), over
time, between bursts (at the end of each idle spell) and at rest after the trace.
"""
from __future__ import annotations

import argparse
import array
import bisect
import csv
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_pool import frame_size

from edged.pool import PAGE, FramePool

MiB = 1 << 20
# configs/edged.yaml's pool defaults, as edged.daemon passes them to FramePool (max_bytes: --cap-mb, default 256)
POOL: dict[str, float] = {"initial_bytes": 1 * MiB, "segment_bytes": 4 * MiB, "idle_release_s": 10.0,
                          "frag_threshold": 0.5, "frag_window_s": 10.0}


class Trace:
    """Alloc and free events in time order: size > 0 allocs frame ``fid``, size 0 frees it."""

    def __init__(self) -> None:
        self.t = array.array("d")
        self.fid = array.array("q")
        self.size = array.array("q")
        self.cycle_start: list[float] = []   # simulated time each cycle begins
        self.cycle_peak: list[int] = []      # bytes live at the burst's peak, had every frame been admitted
        self.end = 0.0


def service_s(size: int) -> float:
    """One Pi-class worker: 50 ms of inference plus decoding at 20 MB/s."""
    return 0.05 + size / 20e6


def make_trace(seed: int, cycles: int, cap: int, pin_every: int, peak: tuple[float, float] = (0.3, 0.8),
               pin_cycles: tuple[int, int] = (2, 12)) -> Trace:
    """The adversarial trace (see the module docstring); the same seed gives the same trace."""
    rng = random.Random(seed)
    probe = random.Random(0)
    mean = sum(frame_size(probe) for _ in range(20000)) / 20000  # the mix's mean frame size
    serve_fps = 1.0 / service_s(round(mean))
    tr = Trace()
    pins: dict[int, list[int]] = {}   # cycle in which they are freed -> fids
    fid = 0
    t = 0.0
    for c in range(cycles):
        tr.cycle_start.append(t)
        burst_s = rng.uniform(15.0, 60.0)
        # the queue grows at (arrival - service) rate during the burst: arrivals chosen to peak near the share
        rate = serve_fps + rng.uniform(*peak) * cap / mean / burst_s
        arrivals: list[tuple[float, int, int]] = []
        a = t
        while (a := a + rng.expovariate(rate)) < t + burst_s:
            arrivals.append((a, fid, frame_size(rng)))
            fid += 1
        done = t
        frees: list[tuple[float, int]] = []
        for a, f, n in arrivals:
            if pin_every and rng.randrange(pin_every) == 0:
                pins.setdefault(c + rng.randint(*pin_cycles), []).append(f)
                continue
            done = max(done, a) + service_s(n)
            frees.append((done, f))
        sizes = {f: n for _, f, n in arrivals}
        live = top = 0
        for _, alloc, f in sorted([(a, 1, f) for a, f, _ in arrivals] + [(d, 0, f) for d, f in frees]):
            live += sizes[f] if alloc else -sizes[f]
            top = max(top, live)
        tr.cycle_peak.append(top)   # this burst's own frames at their peak (pins of earlier cycles aside)
        end = max(done, t + burst_s) + rng.uniform(20.0, 120.0)   # the idle spell
        # every event of this cycle lies in [t, end], so sorting cycle by cycle sorts the trace
        events = arrivals + [(d, f, 0) for d, f in frees] + [(rng.uniform(t, end), f, 0) for f in pins.pop(c, [])]
        if c == cycles - 1:          # pins still held when the trace ends: freed at its end
            events += [(end, f, 0) for fs in pins.values() for f in fs]
        events.sort(key=lambda e: (e[0], e[2] != 0))  # at one instant, frees first
        for e in events:
            tr.t.append(e[0])
            tr.fid.append(e[1])
            tr.size.append(e[2])
        t = end
    tr.end = t
    return tr


def _status_kb(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0])
    return out


def make_arena(kind: str, cap: int, backing: str, clock: Callable[[], float]) -> FramePool:
    """(a) "fixed": one segment of the whole cap, nothing to grow into; (b) "pool": edged's defaults, same cap."""
    p = POOL
    initial, seg = (cap, cap) if kind == "fixed" else (int(p["initial_bytes"]), int(p["segment_bytes"]))
    return FramePool(initial_bytes=initial, max_bytes=cap, segment_bytes=seg, idle_release_s=p["idle_release_s"],
                     frag_threshold=p["frag_threshold"], frag_window_s=p["frag_window_s"], backing=backing,
                     clock=clock)


def replay(kind: str, tr: Trace, cap: int, backing: str, sample_s: float) -> dict:
    """Replay ``tr`` against one arena: samples over simulated time, refusals per cycle, the state at rest."""
    now = [0.0]
    pool = make_arena(kind, cap, backing, lambda: now[0])
    payload = memoryview(random.Random(7).randbytes(7 * MiB))
    live: dict[int, Any] = {}
    refused = 0
    by_cycle = [0] * len(tr.cycle_start)
    refusals: list[tuple[int, int, int]] = []   # (frame bytes, capacity, used) at each refusal
    samples: list[dict] = []
    rest: list[dict] = []                       # at the end of each idle spell, just before the next burst
    next_tick, next_sample, next_cycle = 1.0, 0.0, 1
    wall0 = time.perf_counter()

    def sample(t: float) -> dict:
        st = pool.stats()
        free = st["capacity_bytes"] - st["used_bytes"]
        largest = round((1.0 - st["fragmentation"]) * free)
        room = 0 if kind == "fixed" else (cap - st["capacity_bytes"]) // PAGE * PAGE
        kb = _status_kb("VmRSS", "RssShmem")
        return {"t_s": round(t, 1), "capacity_mb": st["capacity_bytes"] / MiB, "used_mb": round(st["used_bytes"] / MiB, 2),
                "fragmentation": st["fragmentation"], "largest_frame_mb": round(max(largest, room) / MiB, 2),
                "refused": refused, "segments": st["segments"], "recycles": st["recycles"],
                "rss_mb": kb["VmRSS"] / 1024, "shmem_mb": kb.get("RssShmem", 0) / 1024}

    def advance(to: float) -> None:
        nonlocal next_tick, next_sample, next_cycle
        while next_tick <= to:
            now[0] = next_tick
            pool.maintain()
            if next_tick >= next_sample:
                samples.append(sample(next_tick))
                next_sample += sample_s
            next_tick += 1.0
        now[0] = to
        while next_cycle < len(tr.cycle_start) and tr.cycle_start[next_cycle] <= to:
            rest.append({"cycle": next_cycle, **sample(to)})
            next_cycle += 1

    with pool:
        for i in range(len(tr.t)):
            advance(tr.t[i])
            f, n = tr.fid[i], tr.size[i]
            if n:
                b = pool.alloc(n) if backing == "none" else pool.write(payload[:n])
                if b is None:
                    refused += 1
                    by_cycle[bisect.bisect_right(tr.cycle_start, tr.t[i]) - 1] += 1
                    st = pool.stats()
                    refusals.append((n, st["capacity_bytes"], st["used_bytes"]))
                else:
                    live[f] = b
            elif (b := live.pop(f, None)) is not None:
                pool.free(b)
        advance(tr.end + 60.0)               # every frame is freed by tr.end; then a minute's rest
        final = sample(tr.end + 60.0)
        samples.append(final)
    return {"kind": kind, "refused": refused, "refused_by_cycle": by_cycle, "refusals": refusals,
            "samples": samples, "rest": rest, "final": final, "wall_s": round(time.perf_counter() - wall0, 1)}


def replay_child(kind: str, a: argparse.Namespace, trace_args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, __file__, *trace_args, "--sample-s", str(a.sample_s), "--backing", a.backing, "--replay", kind]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE)


# ---- the figures -------------------------------------------------------------------------------
def summarize(a: argparse.Namespace, tr: Trace, res: dict, wall: float) -> dict:
    frames = sum(1 for n in tr.size if n)
    cap = a.cap_mb * MiB
    s: dict[str, Any] = {
        "command": "tools/bench_pool_arena.py " + " ".join(a.argv), "seed": a.seed, "cycles": a.cycles,
        "cap_mb": a.cap_mb, "pin_every": a.pin_every, "peak": a.peak, "backing": a.backing, "frames": frames,
        "simulated_h": round(tr.end / 3600, 2), "burst_peak_share_of_cap_max": round(max(tr.cycle_peak) / cap, 3),
        "wall_s": round(wall, 1), "pool_config": POOL}
    fc, pc = res["fixed"]["refused_by_cycle"], res["pool"]["refused_by_cycle"]
    s["cycles_refusing"] = {"fixed_only": sum(1 for f, p in zip(fc, pc) if f and not p),
                            "pool_only": sum(1 for f, p in zip(fc, pc) if p and not f),
                            "both": sum(1 for f, p in zip(fc, pc) if f and p)}
    for k, r in res.items():
        sm, rest, ref = r["samples"], r["rest"], r["refusals"]
        first = next((i + 1 for i, n in enumerate(r["refused_by_cycle"]) if n), None)
        rest_shmem = sorted(x["shmem_mb"] for x in rest) or [0.0]
        rest_cap = sorted(x["capacity_mb"] for x in rest) or [0.0]
        s[k] = {"refused": r["refused"], "refused_share": round(r["refused"] / max(frames, 1), 6),
                "cycles_with_refusals": sum(1 for n in r["refused_by_cycle"] if n), "first_refusing_cycle": first,
                "refused_frame_mb_min": round(min((x[0] for x in ref), default=0) / MiB, 2),
                "refused_frame_mb_median": round(sorted(x[0] for x in ref)[len(ref) // 2] / MiB, 2) if ref else 0,
                "refused_over_4mib_share": round(sum(1 for x in ref if x[0] > 4 * MiB) / max(len(ref), 1), 3),
                "free_mb_at_refusal_median": round(sorted(x[1] - x[2] for x in ref)[len(ref) // 2] / MiB, 1)
                if ref else 0,
                "capacity_mb_at_refusal_min": round(min((x[1] for x in ref), default=0) / MiB, 1),
                # refusals while the room under the cap would have taken a segment for the frame: none, by design
                "refused_with_room_for_it": sum(1 for n, c, _ in ref if (cap - c) // PAGE * PAGE >= -(-n // 64) * 64),
                "free_mb_at_refusal_max": round(max((x[1] - x[2] for x in ref), default=0) / MiB, 1),
                "fragmentation_mean": round(sum(x["fragmentation"] for x in sm) / len(sm), 4),
                "fragmentation_max": max(x["fragmentation"] for x in sm),
                "largest_frame_mb_min": min(x["largest_frame_mb"] for x in sm),
                "capacity_mb_mean": round(sum(x["capacity_mb"] for x in sm) / len(sm), 1),
                "capacity_mb_max": max(x["capacity_mb"] for x in sm),
                "recycles": r["final"]["recycles"],
                "shmem_mb_mean": round(sum(x["shmem_mb"] for x in sm) / len(sm), 1),
                "shmem_mb_max": max(x["shmem_mb"] for x in sm),
                "between_bursts_shmem_mb_median": rest_shmem[len(rest_shmem) // 2],
                "between_bursts_shmem_mb_max": rest_shmem[-1],
                "between_bursts_capacity_mb_median": rest_cap[len(rest_cap) // 2],
                "final_rest_shmem_mb": r["final"]["shmem_mb"], "final_rest_rss_mb": r["final"]["rss_mb"],
                "final_rest_capacity_mb": r["final"]["capacity_mb"], "wall_s": r["wall_s"]}
    return s


def report(s: dict) -> None:
    print(f"{s['frames']:,} frames in {s['cycles']} cycles, {s['simulated_h']} h simulated, cap {s['cap_mb']} MiB, "
          f"1 frame in {s['pin_every']} pinned, seed {s['seed']}, backing {s['backing']}, {s['wall_s']} s wall")
    for k in ("fixed", "pool"):
        r = s[k]
        print(f"  {k}: refused {r['refused']:,} frames ({r['refused_share']:.4%}) in {r['cycles_with_refusals']} cycles, "
              f"first in cycle {r['first_refusing_cycle']}")
        print(f"    refused frames: median {r['refused_frame_mb_median']} MiB, {r['refused_over_4mib_share']:.0%} over "
              f"4 MiB; at capacity >= {r['capacity_mb_at_refusal_min']} MiB, with a median "
              f"{r['free_mb_at_refusal_median']} MiB (max {r['free_mb_at_refusal_max']}) free")
        print(f"    fragmentation mean {r['fragmentation_mean']} max {r['fragmentation_max']}; largest frame it could "
              f"take, min {r['largest_frame_mb_min']} MiB; capacity mean {r['capacity_mb_mean']} max "
              f"{r['capacity_mb_max']:.0f} MiB; recycles {r['recycles']}")
        print(f"    RssShmem mean {r['shmem_mb_mean']} max {r['shmem_mb_max']:.0f} MiB; between bursts median "
              f"{r['between_bursts_shmem_mb_median']:.1f} max {r['between_bursts_shmem_mb_max']:.1f} MiB; at rest "
              f"after the trace {r['final_rest_shmem_mb']:.1f} MiB (VmRSS {r['final_rest_rss_mb']:.1f} MiB)")
    f, p, c = s["fixed"], s["pool"], s["cycles_refusing"]
    print(f"  cycles with refusals: fixed only {c['fixed_only']}, pool only {c['pool_only']}, both {c['both']}")
    if p["refused"] == 0 and f["refused"]:
        print(f"  the fixed arena refuses from cycle {f['first_refusing_cycle']}; the pool refuses none")
    else:
        print(f"  refusals: fixed first in cycle {f['first_refusing_cycle']}, pool first in cycle "
              f"{p['first_refusing_cycle']}: the pool does NOT refuse fewer here")


def write(out: Path, summary: dict, res: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(out / "samples.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, ["arena", *res["fixed"]["samples"][0]])
        w.writeheader()
        for k, r in res.items():
            w.writerows({"arena": k, **row} for row in r["samples"])


def per_cycle(samples: list[dict], cycle_start: list[float]) -> list[dict]:
    """The samples of each cycle (burst and idle spell) folded into its peaks and means."""
    out: list[dict] = [{} for _ in cycle_start]
    for x in samples:
        c = max(bisect.bisect_right(cycle_start, x["t_s"]) - 1, 0)
        o = out[c]
        if not o:
            o.update(n=0, frag_sum=0.0, capacity_max=0.0, shmem_max=0.0, largest_min=float("inf"))
        o["n"] += 1
        o["frag_sum"] += x["fragmentation"]
        o["capacity_max"] = max(o["capacity_max"], x["capacity_mb"])
        o["shmem_max"] = max(o["shmem_max"], x["shmem_mb"])
        o["largest_min"] = min(o["largest_min"], x["largest_frame_mb"])
    return out


def plot(path: Path, s: dict, res: dict, cycle_start: list[float]) -> str:
    try:
        import matplotlib
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(4, 1, figsize=(12, 11), sharex=True)
    style = {"fixed": ("tab:red", "(a) fixed arena"), "pool": ("tab:blue", "(b) edged pool")}
    for k, r in res.items():
        color, name = style[k]
        cyc = per_cycle(r["samples"], cycle_start)
        idx = [i for i, o in enumerate(cyc) if o]
        th = [cycle_start[i] / 3600 for i in idx]
        rest_t = [cycle_start[x["cycle"]] / 3600 for x in r["rest"]]
        ax[0].plot(th, [cyc[i]["capacity_max"] for i in idx], color=color, lw=0.6, alpha=0.5,
                   label=f"{name}: capacity, peak of each cycle")
        ax[0].plot(rest_t, [x["capacity_mb"] for x in r["rest"]], color=color, lw=1,
                   label=f"{name}: capacity between bursts")
        ax[1].plot(th, [cyc[i]["frag_sum"] / cyc[i]["n"] for i in idx], color=color, lw=0.6,
                   label=f"{name}: mean of each cycle")
        ax[2].step([x["t_s"] / 3600 for x in r["samples"]], [x["refused"] for x in r["samples"]], color=color,
                   where="post", label=f"{name}: {r['refused']:,} refused, first in cycle "
                                       f"{s[k]['first_refusing_cycle']}")
        ax[3].plot(th, [cyc[i]["shmem_max"] for i in idx], color=color, lw=0.6, alpha=0.5,
                   label=f"{name}: peak of each cycle")
        ax[3].plot(rest_t + [r["samples"][-1]["t_s"] / 3600], [x["shmem_mb"] for x in r["rest"]]
                   + [r["final"]["shmem_mb"]], color=color, lw=1, label=f"{name}: between bursts, and at rest "
                                                                       f"after the trace: {r['final']['shmem_mb']:.0f} MiB")
    ax[0].set_ylabel("MiB")
    ax[0].set_title(f"capacity (cap {s['cap_mb']} MiB for both)")
    ax[1].set_ylabel("1 - largest / free")
    ax[1].set_title("fragmentation (the pool's own figure: free space split over segments counts)")
    ax[2].set_ylabel("frames")
    ax[2].set_title("frames refused (nowhere to place them), cumulative")
    ax[3].set_ylabel("MiB")
    ax[3].set_title("resident pool pages (RssShmem of the replaying process)")
    ax[3].set_xlabel("simulated hours")
    for x in ax:
        x.legend(loc="center left", fontsize=7)
    fig.suptitle(f"one adversarial trace, two arenas of {s['cap_mb']} MiB: {s['frames']:,} frames, {s['cycles']} "
                 f"bursts with idle spells, 1 frame in {s['pin_every']} pinned for 2-12 cycles (seed {s['seed']})",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return f"plot written: {path}"


def _sweep_one(job: tuple[int, int, int, int, tuple[float, float]]) -> dict:
    seed, cycles, cap, pin_every, peak = job
    tr = make_trace(seed, cycles, cap, pin_every, peak)
    row: dict[str, Any] = {"pin_every": pin_every, "peak": list(peak)}
    for k in ("fixed", "pool"):
        r = replay(k, tr, cap, "none", 60.0)
        row[k] = {"refused": r["refused"], "cycles_with_refusals": sum(1 for n in r["refused_by_cycle"] if n),
                  "first_refusing_cycle": next((i + 1 for i, n in enumerate(r["refused_by_cycle"]) if n), None)}
    return row


def sweep(a: argparse.Namespace) -> int:
    """The direction of the comparison over pin rates and burst peaks (bookkeeping only, two processes)."""
    import multiprocessing

    t0 = time.perf_counter()
    cap = a.cap_mb * MiB
    jobs = [(a.seed, a.cycles, cap, pe, (hi - 0.5, hi)) for pe in (20, 50, 100, 300) for hi in (0.7, 0.8, 0.9)]
    with multiprocessing.Pool(2) as mp:
        rows = mp.map(_sweep_one, jobs)
    print(f"sweep: {a.cycles} cycles each, seed {a.seed}, cap {a.cap_mb} MiB, bookkeeping only, "
          f"{time.perf_counter() - t0:.0f} s wall")
    print("| pinned | burst peaks (share of cap) | (a) fixed: refused, cycles with refusals, first | "
          "(b) pool: refused, cycles with refusals, first |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        f, p = r["fixed"], r["pool"]
        print(f"| 1 in {r['pin_every']} | {r['peak'][0]:.1f}-{r['peak'][1]:.1f} | {f['refused']:,}, "
              f"{f['cycles_with_refusals']}, {f['first_refusing_cycle'] or '-'} | {p['refused']:,}, "
              f"{p['cycles_with_refusals']}, {p['first_refusing_cycle'] or '-'} |")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "sweep.json").write_text(json.dumps({"command": "tools/bench_pool_arena.py " + " ".join(a.argv),
                                                      "rows": rows}, indent=1) + "\n")
    return 0


# ---- the run -----------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=1860,
                    help="bursts, each with its idle spell (default 1860: about 72 simulated hours)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cap-mb", type=int, default=256, help="the cap of both, pool.max_mb (default 256)")
    ap.add_argument("--pin-every", type=int, default=50, help="one frame in N is pinned for 2-12 cycles (default 50)")
    ap.add_argument("--peak", type=float, nargs=2, default=[0.3, 0.8], metavar=("LO", "HI"),
                    help="each burst peaks at a share of the cap drawn from [LO, HI] (default 0.3 0.8)")
    ap.add_argument("--sweep", action="store_true",
                    help="instead: bookkeeping-only replays over a grid of --pin-every and --peak values")
    ap.add_argument("--sample-s", type=float, default=10.0, help="simulated seconds between samples (default 10)")
    ap.add_argument("--backing", choices=["memfd", "none"], default="memfd",
                    help="none: bookkeeping only, no payload copies and no RSS (for long traces)")
    ap.add_argument("--out", type=Path, help="write summary.json and samples.csv here")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "pool-arena.png",
                    help="the PNG, with the summary beside it as .json (default docs/pool-arena.png)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--replay", choices=["fixed", "pool"], help=argparse.SUPPRESS)  # the child's side
    a = ap.parse_args(argv)
    a.argv = argv
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    cap = a.cap_mb * MiB
    if a.replay:
        tr = make_trace(a.seed, a.cycles, cap, a.pin_every, tuple(a.peak))
        json.dump(replay(a.replay, tr, cap, a.backing, a.sample_s), sys.stdout)
        return 0
    t0 = time.perf_counter()
    if a.sweep:
        return sweep(a)
    trace_args = ["--cycles", str(a.cycles), "--seed", str(a.seed), "--cap-mb", str(a.cap_mb),
                  "--pin-every", str(a.pin_every), "--peak", str(a.peak[0]), str(a.peak[1])]
    kids = {k: replay_child(k, a, trace_args) for k in ("fixed", "pool")}   # both at once: one per core
    res = {}
    for k, p in kids.items():
        out, _ = p.communicate()
        if p.returncode:
            print(f"replay of {k} failed (exit {p.returncode})", file=sys.stderr)
            return 1
        res[k] = json.loads(out)
    tr = make_trace(a.seed, a.cycles, cap, a.pin_every, tuple(a.peak))
    summary = summarize(a, tr, res, time.perf_counter() - t0)
    report(summary)
    if a.out:
        write(a.out, summary, res)
    if not a.no_plot:
        print(plot(a.plot, summary, res, tr.cycle_start))
        a.plot.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
