"""The raw invoke loop's best use of the cores: P processes x T threads each, side by side, in one run.

    .venv/bin/python tools/raw_cores.py -c bench.yaml [--layouts 1x1,1x2,2x1] [--seconds 10] [--rounds 3]

Each layout runs P interpreter processes (each with T threads, the input set
once) for `seconds`, at the same time; throughput is the sum of their
invokes per second. Layouts alternate within each round (round-robin), so
drift on a shared machine hits them alike; medians over the rounds are
printed, with each as a ratio of 1x1. Compare with `edged bench --json`'s
e2e fps at accelerator.workers x model.threads of the same shape.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edged import config, runtime


def _loop(path: str, threads: int, seconds: float, start: float, out: mp.Queue) -> None:
    interp = runtime.backend_module().Interpreter(model_path=path, num_threads=threads)
    interp.allocate_tensors()
    d = interp.get_input_details()[0]
    interp.set_tensor(d["index"], np.random.default_rng(0).integers(0, 255, size=d["shape"]).astype(d["dtype"]))
    for _ in range(3):
        interp.invoke()
    while time.monotonic() < start:
        time.sleep(0.001)
    n, end = 0, start + seconds
    while time.monotonic() < end:
        interp.invoke()
        n += 1
    out.put(n / (time.monotonic() - start))


def run_layout(path: str, procs: int, threads: int, seconds: float) -> float:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    start = time.monotonic() + 3.0  # all loaded before any starts
    ps = [ctx.Process(target=_loop, args=(path, threads, seconds, start, q)) for _ in range(procs)]
    for p in ps:
        p.start()
    fps = sum(q.get(timeout=seconds + 60) for _ in ps)
    for p in ps:
        p.join()
    return fps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--layouts", default="1x1,1x2,2x1", help="PxT,...: processes x threads")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = config.load(args.config)
    layouts = [tuple(int(x) for x in lay.split("x")) for lay in args.layouts.split(",")]
    got: dict[tuple[int, ...], list[float]] = {lay: [] for lay in layouts}
    for r in range(args.rounds):
        order = layouts[r % len(layouts):] + layouts[:r % len(layouts)]
        for lay in order:
            got[lay].append(run_layout(cfg.model.path, lay[0], lay[1], args.seconds))
    base = statistics.median(got[layouts[0]])
    print(f"raw invoke loop, {Path(cfg.model.path).name}, {args.rounds} rounds of {args.seconds:g} s per layout")
    for lay, v in got.items():
        m = statistics.median(v)
        print(f"{lay[0]} process(es) x {lay[1]} thread(s): {m:.1f} fps (x{m / base:.2f} of {layouts[0][0]}x"
              f"{layouts[0][1]}; rounds: {' '.join(f'{x:.1f}' for x in v)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
