"""Where the GPU path's time goes around the invoke: the host copies in and out, measured per variant.

    python tools/gpu_io.py MODEL [N]

Variants, interleaved in rounds (medians of per-round means, ms per frame):
  bare      run on what the GPU input buffer holds (the bench's raw anchor: no frame moves)
  write     TensorBuffer.write of the host frame, then run (edged's GpuModel.invoke until 2026-12-01)
  bound     the host frame bound once with TensorBuffer.create_from_host_memory, then run
  +read     each of the above plus reading the outputs back
Needs a Vulkan GPU (the lent machine, tools/gpu_check.sh).
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import numpy as np


def main() -> int:
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import Options
    from ai_edge_litert.tensor_buffer import TensorBuffer

    from edged.runtime import Model

    path = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    cpu = Model(path)
    shape, dtype = cpu.input.shape, np.dtype(cpu.input.dtype)
    outs_info = [(int(np.prod(o.shape)), np.dtype(o.dtype)) for o in cpu.outputs]
    cm = CompiledModel.from_file(path, options=Options(HardwareAccelerator.GPU))
    ins, outs = cm.create_input_buffers(0), cm.create_output_buffers(0)
    host = np.random.default_rng(0).integers(0, 255, shape).astype(dtype)
    bound_host = np.zeros(shape, dtype)
    bound = [TensorBuffer.create_from_host_memory(bound_host)]

    def read() -> None:
        for b, (k, dt) in zip(outs, outs_info, strict=False):
            b.read(k, dt)

    def bare() -> None:
        cm.run_by_index(0, ins, outs)

    def write() -> None:
        ins[0].write(host)
        cm.run_by_index(0, ins, outs)

    def bind() -> None:
        bound_host[...] = host
        cm.run_by_index(0, bound, outs)

    variants: dict[str, Any] = {"bare": bare, "write": write}
    try:
        bind()
        variants["bound"] = bind
    except RuntimeError as exc:  # LiteRT 2.3's GPU accelerator refuses a host-memory input buffer
        print(f"gpu_io: a host-memory input buffer is refused: {' '.join(str(exc).split())[:120]}")
    for name, fn in list(variants.items()):
        variants[name + "+read"] = (lambda f: (lambda: (f(), read())))(fn)
    # the bound buffer must give the same answers as the written one
    same = None
    if "bound" in variants:
        write()
        a = [b.read(k, dt) for b, (k, dt) in zip(outs, outs_info, strict=False)]
        bind()
        b2 = [b.read(k, dt) for b, (k, dt) in zip(outs, outs_info, strict=False)]
        same = all(np.array_equal(x, y) for x, y in zip(a, b2, strict=True))
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(5):
        for name, fn in variants.items():
            for _ in range(20):
                fn()
            t = time.perf_counter()
            for _ in range(n // 5):
                fn()
            times[name].append((time.perf_counter() - t) * 1000 / (n // 5))
    base = statistics.median(times["bare"])
    print(f"gpu_io: {path.rsplit('/', 1)[-1]}, {n} frames per variant in 5 rounds; bound == written outputs: {same}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:12s} {m:7.3f} ms/frame  {base / m:5.3f} of bare")
    return 0


if __name__ == "__main__":
    sys.exit(main())
