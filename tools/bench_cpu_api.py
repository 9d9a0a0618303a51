#!/usr/bin/env python3
"""LiteRT's two CPU APIs on one model, in one process: Interpreter (XNNPACK) vs CompiledModel (CPU).

edged serves CPU models through the Interpreter (per-tensor quantization, variable
reset, batch resize) and uses CompiledModel for the GPU. This checks whether the
CompiledModel CPU path would be faster: both run the same input with the same
thread count, in interleaved rounds of N invokes, after a warm-up; the medians
and their ratio are printed. CompiledModel with YNNPACK is tried too (builds
without it refuse).

    .venv/bin/python tools/bench_cpu_api.py MODEL [--threads 1] [--rounds 6] [-n 100]
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from ai_edge_litert.compiled_model import CompiledModel
from ai_edge_litert.cpu_options import CpuOptions
from ai_edge_litert.hardware_accelerator import HardwareAccelerator
from ai_edge_litert.interpreter import Interpreter
from ai_edge_litert.options import Options


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("-n", type=int, default=100, help="invokes per round")
    args = ap.parse_args()

    interp = Interpreter(model_path=args.model, num_threads=args.threads)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    x = np.random.default_rng(0).integers(0, 256, inp["shape"], dtype=np.uint8).astype(inp["dtype"])
    interp.set_tensor(inp["index"], x)
    paths: dict[str, Callable[[], None]] = {"interpreter": interp.invoke}
    for name, ynnpack in (("compiled_cpu", False), ("compiled_cpu_ynnpack", True)):
        try:
            opts = Options(HardwareAccelerator.CPU, cpu_options=CpuOptions(num_threads=args.threads,
                                                                            enable_ynnpack=ynnpack))
            cm = CompiledModel.from_file(args.model, options=opts)
            ins, outs = cm.create_input_buffers(0), cm.create_output_buffers(0)
            ins[0].write(x)
            paths[name] = lambda cm=cm, ins=ins, outs=outs: cm.run_by_index(0, ins, outs)
        except (RuntimeError, ValueError) as exc:
            print(f"{name}: not available ({' '.join(str(exc).split())[:120]})")
    ms: dict[str, list[float]] = {k: [] for k in paths}
    for run in paths.values():
        for _ in range(20):
            run()
    for _ in range(args.rounds):
        for name, run in paths.items():
            t0 = time.perf_counter()
            for _ in range(args.n):
                run()
            ms[name].append((time.perf_counter() - t0) / args.n * 1e3)
    base = statistics.median(ms["interpreter"])
    for name, v in ms.items():
        print(f"{name:22s} {statistics.median(v):8.3f} ms/invoke (median of {args.rounds} rounds of {args.n}; "
              f"min {min(v):.3f})  ratio to interpreter {statistics.median(v) / base:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
