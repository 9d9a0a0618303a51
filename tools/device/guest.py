"""Helpers that run inside the emulated device (copied there with the checkout).

    python3 guest.py reference MODEL TOP_K FILE...   plain LiteRT interpreter, one JSON line per file
    python3 guest.py pss                             PSS (KiB) of the edged unit's processes, as JSON
    python3 guest.py cpu                             CPU time (usec) of the edged unit's cgroup
    python3 guest.py forbidden                       sandbox test-hook cases: forbidden calls under the filter
    python3 guest.py refused TRACE                   syscalls in a strace of tools/trace_worker.py after its
                                                     marker that edged.sandbox's table does not allow here

`reference` deliberately does not import edged: it is the "plain interpreter"
the daemon's results are compared with. It decodes images as the contract
says (Pillow; 1-channel inputs get the mean of R, G and B; JPEG draft;
bilinear resize) and feeds uint8/int8/float inputs as the contract says.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup/system.slice/edged.service")


def reference(model: str, top_k: int, files: list[str]) -> None:
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter
    from PIL import Image

    interp = Interpreter(model_path=model, num_threads=1)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    out = interp.get_output_details()[0]
    _, h, w, c = inp["shape"]
    for f in files:
        data = Path(f).read_bytes()
        if len(data) == int(np.prod(inp["shape"])) * np.dtype(inp["dtype"]).itemsize:
            x = np.frombuffer(data, inp["dtype"]).reshape(inp["shape"])
        else:
            img = Image.open(f)
            mode = "L" if c == 1 else "RGB"
            if img.format == "JPEG":
                img.draft(mode, (w, h))
            if mode == "L" and img.mode != "L":
                rgb = np.asarray(img.convert("RGB"), dtype=np.uint16)
                img = Image.fromarray((rgb.sum(axis=2) // 3).astype(np.uint8), "L")
            else:
                img = img.convert(mode)
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            px = np.asarray(img, dtype=np.uint8).reshape(h, w, c)
            if inp["dtype"] == np.uint8:
                x = px
            elif inp["dtype"] == np.int8:
                x = (px.astype(np.int16) - 128).astype(np.int8)
            else:
                x = (px.astype(np.float32) - 127.5) / 127.5
            x = x.reshape(inp["shape"]).astype(inp["dtype"])
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        raw = interp.get_tensor(out["index"]).reshape(-1)
        scale, zero = out["quantization"]
        scores = (raw.astype(np.float64) - zero) * scale if scale else raw.astype(np.float64)
        order = sorted(range(raw.size), key=lambda i: (-scores[i], i))[:top_k]
        print(json.dumps({"file": f, "classes": [{"id": i, "score": round(float(scores[i]), 4)} for i in order],
                          "step": float(scale)}), flush=True)


def unit_pids() -> list[int]:
    return [int(p) for p in (CGROUP / "cgroup.procs").read_text().split()]


def pss() -> None:
    main = int(subprocess.run(["systemctl", "show", "-P", "MainPID", "edged"], capture_output=True,
                              text=True, check=True).stdout.strip() or 0)
    out: dict[str, int] = {"daemon_kib": 0, "workers_kib": 0, "procs": 0}
    for pid in unit_pids():
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        kib = next(int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:"))
        out["daemon_kib" if pid == main else "workers_kib"] += kib
        out["procs"] += 1
    events = (CGROUP / "memory.events").read_text().split()
    out["oom_kill"] = int(events[events.index("oom_kill") + 1])
    out["cgroup_current_kib"] = int((CGROUP / "memory.current").read_text()) // 1024
    print(json.dumps(out))


def cpu() -> None:
    stat = dict(line.split() for line in (CGROUP / "cpu.stat").read_text().splitlines())
    print(json.dumps({"usage_usec": int(stat["usage_usec"])}))


FORBIDDEN = {  # the cases of tests/test_sandbox.py's FORBIDDEN, on this arch
    "socket": ("import socket", "socket.socket()"),
    "open": ("", "open(sys.executable, 'rb')"),
    "execv": ("", "os.execv(sys.executable, [sys.executable, '-c', 'pass'])"),
    "fork": ("", "os.fork()"),
    "subprocess": ("import subprocess", "subprocess.run(['true'])"),
}


def forbidden() -> None:
    results = {}
    for case, (before, call) in FORBIDDEN.items():
        code = (f"import os, sys\nfrom edged import sandbox\n{before}\n"
                "sandbox.harden(memory_limit_bytes=None, keep_fds=())\nsandbox.install_filter('kill')\n"
                f"print('armed', flush=True)\n{call}\nprint('survived', flush=True)\n")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
        ok = r.returncode == -signal.SIGSYS and r.stdout.split() == ["armed"]
        results[case] = {"ok": ok, "rc": r.returncode, "stdout": r.stdout.split(), "stderr": r.stderr[-300:]}
    print(json.dumps(results))


def refused(trace: str) -> None:
    import re

    from edged import sandbox

    allowed = set(sandbox.allowed_syscalls())
    counts: dict[str, int] = {}
    marker = False
    for line in open(trace, errors="replace"):
        m = re.match(r"^(\d+)\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]", line)
        if not m:
            continue
        name = m.group(2)
        if name == "getppid":
            marker = True
        elif marker and name not in ("resumed", "exited", "killed"):
            counts[name] = counts.get(name, 0) + 1
    print(json.dumps({"marker": marker, "used": counts, "refused": sorted(n for n in counts if n not in allowed),
                      "allowed_unused": sorted(allowed - set(counts)), "arch": os.uname().machine}))


def main(argv: list[str]) -> None:
    cmd = argv[0] if argv else ""
    if cmd == "reference":
        reference(argv[1], int(argv[2]), argv[3:])
    elif cmd == "pss":
        pss()
    elif cmd == "cpu":
        cpu()
    elif cmd == "forbidden":
        forbidden()
    elif cmd == "refused":
        refused(argv[1])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
