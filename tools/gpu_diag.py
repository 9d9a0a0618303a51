"""GPU diagnostics: open fds over many invokes (a leak shows as growth) and GPU vs CPU outputs.

    python tools/gpu_diag.py MODEL IMAGE [N]
"""
import os
import sys

import numpy as np
from PIL import Image

from edged.runtime import GpuModel, Model

path, image = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 200
cpu = Model(path)
h, w = cpu.input.shape[1:3]
x = np.asarray(Image.open(image).convert("RGB").resize((w, h), Image.Resampling.BILINEAR), np.uint8)[None]
cpu.set_input(x)
cpu.invoke()
ref = cpu.output(0).astype(np.int32).reshape(-1)
print("cpu top-3", np.argsort(-ref)[:3].tolist(), ref[np.argsort(-ref)[:3]].tolist())
for fp32 in (True, False):
    gpu = GpuModel(path, fp32=fp32)
    diffs, fds = [], []
    for i in range(n):
        gpu.set_input(x)
        gpu.invoke()
        out = gpu.output(0).astype(np.int32).reshape(-1)
        if i < 5:
            diffs.append(int(np.abs(out - ref).max()))
        if i % 50 == 0:
            fds.append(len(os.listdir("/proc/self/fd")))
    top = np.argsort(-out)[:3]
    print(f"gpu fp32={fp32}: max |gpu-cpu| in quant steps over the first 5 invokes {diffs}; "
          f"top-3 {top.tolist()} {out[top].tolist()}; open fds every 50 invokes {fds}")
