#!/usr/bin/env python3
"""The pool claim side by side: one adversarial allocation trace against a fixed arena and edged's pool.

    .venv/bin/python tools/bench_pool_arena.py                     # the full run (a few minutes), docs/pool-arena.png
    .venv/bin/python tools/bench_pool_arena.py --cycles 40 --out /tmp/pa --no-plot

The same seeded trace is replayed, in simulated time, against
  (a) fixed: FramePool(initial_bytes=cap, max_bytes=cap): the same best-fit, coalescing allocator and
      the same memfd backing as edged's pool, but one segment the size of the cap. There is nothing to
      grow into, the base segment is never released, and recycling needs two segments, so it never
      resizes or recycles: a classic fixed arena, and a kind one (best-fit fragments less than first-fit);
  (b) pool: FramePool as edged's daemon builds it from configs/edged.yaml's defaults (1 MiB base,
      4 MiB segments, 256 MiB cap, idle release after 10 s, recycling above 0.5 fragmentation for 10 s).
Each runs in a child process of its own, so its RSS is its own; maintain() runs once per simulated
second, as the daemon's upkeep does; every admitted frame's payload is copied into its block (the
daemon's one copy), so the pages a frame touches are really resident.

The trace (all of it drawn from --seed before either replay, so both see the same frames at the
same simulated times) is a sequence of cycles, each a burst and an idle spell:
  - burst: frames arrive (Poisson) faster than one worker serves them (8 ms + 1 ms per 50 kB, FIFO),
    so the queue, and the pool, fill to a peak of 30-80% of the cap, then drain; frame sizes are
    tools/bench_pool.py's mix (ESP32 JPEGs, HD JPEGs, 1-6 MB PNGs, raw tensors), drawn per frame;
  - pinned: one frame in --pin-every stays live for 2-12 more cycles (a stalled stream, a consumer
    that holds its frame) and is freed at a random moment of a later cycle, bursts and idle spells alike;
  - idle: 20-120 s with no arrivals, longer than idle_release_s.
A frame the arena cannot place is refused (what edged answers with an error, "frame pool is full");
its later free is skipped, and the trace goes on unchanged. At the end every frame is freed and
both rest for 60 simulated seconds.

Reported per arena over simulated time (samples.csv, one row per --sample-s per arena): capacity,
used, fragmentation (1 - largest free extent / free bytes: the pool's own figure), the largest frame
it could take now (the largest free extent; for the pool also the room left under the cap for a new
segment), refusals, and RSS (VmRSS and RssShmem from /proc/self/status; the pool's memfd pages are
RssShmem). summary.json holds the figures; the plot goes to --plot (default docs/pool-arena.png).
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
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_pool import frame_size  # noqa: E402
from edged.pool import PAGE, FramePool  # noqa: E402

MiB = 1 << 20
# configs/edged.yaml's pool defaults, as edged.daemon passes them to FramePool
POOL = {"initial_bytes": 1 * MiB, "max_bytes": 256 * MiB, "segment_bytes": 4 * MiB,
        "idle_release_s": 10.0, "frag_threshold": 0.5, "frag_window_s": 10.0}


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
    events: list[tuple[float, int, int]] = []
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
            events.append((a, f, n))
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
        events.extend((d, f, 0) for d, f in frees)
        end = max(done, t + burst_s) + rng.uniform(20.0, 120.0)   # the idle spell
        events.extend((rng.uniform(t, end), f, 0) for f in pins.pop(c, []))
        t = end
    for fs in pins.values():                 # pins still held when the trace ends: freed at its end
        events.extend((t, f, 0) for f in fs)
    events.sort(key=lambda e: (e[0], e[2] != 0))  # at one instant, frees first
    for e in events:
        tr.t.append(e[0])
        tr.fid.append(e[1])
        tr.size.append(e[2])
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
    if kind == "fixed":
        return FramePool(initial_bytes=cap, max_bytes=cap, segment_bytes=cap, backing=backing, clock=clock,
                         **{k: POOL[k] for k in ("idle_release_s", "frag_threshold", "frag_window_s")})
    return FramePool(**{**POOL, "max_bytes": cap}, backing=backing, clock=clock)


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
        "cap_mb": a.cap_mb, "pin_every": a.pin_every, "backing": a.backing, "frames": frames,
        "simulated_h": round(tr.end / 3600, 2), "burst_peak_share_of_cap_max": round(max(tr.cycle_peak) / cap, 3),
        "wall_s": round(wall, 1), "pool_config": POOL}
    for k, r in res.items():
        sm, rest, ref = r["samples"], r["rest"], r["refusals"]
        first = next((i + 1 for i, n in enumerate(r["refused_by_cycle"]) if n), None)
        rest_shmem = sorted(x["shmem_mb"] for x in rest) or [0.0]
        rest_cap = sorted(x["capacity_mb"] for x in rest) or [0.0]
        s[k] = {"refused": r["refused"], "refused_share": round(r["refused"] / max(frames, 1), 6),
                "cycles_with_refusals": sum(1 for n in r["refused_by_cycle"] if n), "first_refusing_cycle": first,
                "refused_frame_mb_min": round(min((x[0] for x in ref), default=0) / MiB, 2),
                "capacity_mb_at_refusal_min": round(min((x[1] for x in ref), default=0) / MiB, 1),
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
              f"first in cycle {r['first_refusing_cycle']}; refused frames >= {r['refused_frame_mb_min']} MiB, at "
              f"capacity >= {r['capacity_mb_at_refusal_min']} MiB with up to {r['free_mb_at_refusal_max']} MiB free")
        print(f"    fragmentation mean {r['fragmentation_mean']} max {r['fragmentation_max']}; largest frame it could "
              f"take, min {r['largest_frame_mb_min']} MiB; capacity mean {r['capacity_mb_mean']} max "
              f"{r['capacity_mb_max']:.0f} MiB; recycles {r['recycles']}")
        print(f"    RssShmem mean {r['shmem_mb_mean']} max {r['shmem_mb_max']:.0f} MiB; between bursts median "
              f"{r['between_bursts_shmem_mb_median']:.1f} max {r['between_bursts_shmem_mb_max']:.1f} MiB; at rest "
              f"after the trace {r['final_rest_shmem_mb']:.1f} MiB (VmRSS {r['final_rest_rss_mb']:.1f} MiB)")
    f, p = s["fixed"], s["pool"]
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


def plot(path: Path, s: dict, res: dict) -> str:
    try:
        import matplotlib
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install matplotlib)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(5, 1, figsize=(12, 13), sharex=True)
    style = {"fixed": ("tab:red", "(a) fixed arena"), "pool": ("tab:blue", "(b) edged pool")}
    for k, r in res.items():
        color, name = style[k]
        t = [x["t_s"] / 3600 for x in r["samples"]]

        def col(key: str) -> list[float]:
            return [x[key] for x in r["samples"]]  # noqa: B023
        ax[0].plot(t, col("capacity_mb"), color=color, lw=1, label=f"{name}: capacity")
        ax[0].plot(t, col("used_mb"), color=color, lw=0.4, alpha=0.5, label=f"{name}: used")
        ax[1].plot(t, col("fragmentation"), color=color, lw=0.5, alpha=0.8, label=name)
        ax[2].plot(t, col("largest_frame_mb"), color=color, lw=0.5, alpha=0.8, label=name)
        ax[3].step(t, col("refused"), color=color, where="post", label=f"{name}: {r['refused']:,} refused")
        ax[4].plot(t, col("shmem_mb"), color=color, lw=1, label=f"{name}: RssShmem (pool pages)")
        ax[4].plot(t, col("rss_mb"), color=color, lw=0.5, ls=":", label=f"{name}: VmRSS (process)")
    ax[0].set_ylabel("MiB")
    ax[0].set_title(f"capacity and used (cap {s['cap_mb']} MiB)")
    ax[1].set_ylabel("1 - largest / free")
    ax[1].set_title("fragmentation (the pool's own figure)")
    ax[2].axhline(6 * 1_000_000 / MiB, color="0.4", lw=0.6, ls="--", label="largest frame of the mix (6 MB)")
    ax[2].set_yscale("log")
    ax[2].set_ylabel("MiB")
    ax[2].set_title("largest frame it could take now (largest free extent; pool: or the room for a new segment)")
    ax[3].set_ylabel("frames")
    ax[3].set_title("frames refused, cumulative")
    ax[4].set_ylabel("MiB")
    ax[4].set_title("resident memory")
    ax[4].set_xlabel("simulated hours")
    for x in ax:
        x.legend(loc="upper left", fontsize=7)
    fig.suptitle(f"one adversarial trace, two arenas: {s['frames']:,} frames, {s['cycles']} bursts with idle spells, "
                 f"1 in {s['pin_every']} pinned for 2-12 cycles (seed {s['seed']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return f"plot written: {path}"


# ---- the run -----------------------------------------------------------------------------------
def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=300, help="bursts, each with its idle spell (default 300)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cap-mb", type=int, default=256, help="the cap of both, pool.max_mb (default 256)")
    ap.add_argument("--pin-every", type=int, default=50, help="one frame in N is pinned for 2-12 cycles (default 50)")
    ap.add_argument("--sample-s", type=float, default=10.0, help="simulated seconds between samples (default 10)")
    ap.add_argument("--backing", choices=["memfd", "none"], default="memfd",
                    help="none: bookkeeping only, no payload copies and no RSS (for long traces)")
    ap.add_argument("--out", type=Path, help="write summary.json and samples.csv here")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "pool-arena.png", help="default docs/pool-arena.png")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--replay", choices=["fixed", "pool"], help=argparse.SUPPRESS)  # the child's side
    a = ap.parse_args(argv)
    a.argv = argv
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    cap = a.cap_mb * MiB
    if a.replay:
        tr = make_trace(a.seed, a.cycles, cap, a.pin_every)
        json.dump(replay(a.replay, tr, cap, a.backing, a.sample_s), sys.stdout)
        return 0
    t0 = time.perf_counter()
    trace_args = ["--cycles", str(a.cycles), "--seed", str(a.seed), "--cap-mb", str(a.cap_mb),
                  "--pin-every", str(a.pin_every)]
    kids = {k: replay_child(k, a, trace_args) for k in ("fixed", "pool")}   # both at once: one per core
    res = {}
    for k, p in kids.items():
        out, _ = p.communicate()
        if p.returncode:
            print(f"replay of {k} failed (exit {p.returncode})", file=sys.stderr)
            return 1
        res[k] = json.loads(out)
    tr = make_trace(a.seed, a.cycles, cap, a.pin_every)
    summary = summarize(a, tr, res, time.perf_counter() - t0)
    report(summary)
    if a.out:
        write(a.out, summary, res)
    if not a.no_plot:
        print(plot(a.plot, summary, res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
