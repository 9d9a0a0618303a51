"""Trace what a worker does after its warm-up, to find (or re-check) the seccomp allowlist.

    strace -f -qq -o trace.txt python tools/trace_worker.py CONFIG [FRAMES...]
    python tools/trace_worker.py --summarize trace.txt

It loads the model the way the worker does (edged.accel.choose: Coral, GPU or
CPU per the config), warms up and decodes one tiny image of each format, then
calls getppid() as a marker and serves the frames (image files; default: a
zero tensor) the way the worker does, through a memfd. --summarize lists the
syscalls of every thread after the marker, with counts, and which of them the
worker's filter (edged.sandbox, plus GPU_EXTRA for a GPU model) would refuse.
"""
from __future__ import annotations

import collections
import mmap
import os
import re
import sys


def serve(config_path: str, frames: list[str]) -> None:
    import numpy as np

    from edged import accel, config, postprocess, preprocess

    cfg = config.load(config_path)
    choice = accel.choose(cfg)
    model = choice.model
    pre = preprocess.Preprocessor(model.input, cfg.model.mean, cfg.model.std)
    model.warm_up()
    import io

    from PIL import Image

    if pre.layout is not None:
        for fmt in ("JPEG", "PNG", "BMP"):
            buf = io.BytesIO()
            Image.new("RGB", (17, 13)).save(buf, fmt)
            pre.fill(np.zeros(model.input.shape, model.input.dtype), memoryview(buf.getvalue()))
    payloads = [open(f, "rb").read() for f in frames] or [bytes(model.input.nbytes)]
    fd = os.memfd_create("trace-frames")
    os.ftruncate(fd, max(len(p) for p in payloads))
    print(f"accelerator {choice.kind}; marker next", file=sys.stderr, flush=True)
    os.getppid()  # the marker: everything after it is what the filter must allow
    seg = mmap.mmap(fd, max(len(p) for p in payloads))
    for _ in range(3):
        for p in payloads:
            seg[: len(p)] = p
            dst = model.input_view()
            pre.fill(dst, memoryview(seg)[: len(p)])
            del dst
            model.invoke()
            postprocess.classify(model, {}, 3) if cfg.model.task == "classify" else postprocess.raw(model)
    print(f"accelerator {choice.kind}: served {3 * len(payloads)} frames", file=sys.stderr, flush=True)
    os._exit(0)


def summarize(trace: str) -> None:
    from edged import sandbox

    after: dict[str, bool] = {}
    counts: collections.Counter[str] = collections.Counter()
    seen_marker = False
    for line in open(trace, errors="replace"):
        m = re.match(r"^(\d+)\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]", line)
        if not m:
            continue
        name = m.group(2)
        if name == "getppid":
            seen_marker = True
            continue
        if seen_marker and name not in ("resumed", "exit", "exited", "killed"):
            counts[name] += 1
            after[name] = True
    allowed = set(sandbox.allowed_syscalls()) | set(sandbox.GPU_EXTRA)
    for name, n in counts.most_common():
        print(f"{name:24} {n:8}  {'allowed' if name in allowed else 'REFUSED by the filter'}")
    if not seen_marker:
        print("no marker (getppid) in the trace")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summarize"]:
        summarize(sys.argv[2])
    else:
        serve(sys.argv[1], sys.argv[2:])
