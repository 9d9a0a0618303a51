"""Helpers that run inside the emulated device (copied there with the checkout).

    python3 guest.py reference MODEL TOP_K FILE...   plain interpreter (LiteRT, else tflite-runtime), one JSON
                                                     line per file
    python3 guest.py pss                             PSS (KiB) of the edged unit's processes, as JSON
    python3 guest.py cpu                             CPU time (usec) of the edged unit's cgroup and its daemon
    python3 guest.py bench MODEL N                   median invoke (ms) of the plain interpreter
    python3 guest.py forbidden                       sandbox test-hook cases: forbidden calls under the filter
    python3 guest.py refused [--attached] TRACE      syscalls a worker made under its filter (strace -f) that
                                                     edged.sandbox's table does not allow here

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
    from PIL import Image

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # the tflite-runtime venv (numpy<2) has only that runtime
        from tflite_runtime.interpreter import Interpreter

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
    """The unit's cgroup CPU time, and the daemon's own (utime + stime), in usec."""
    stat = dict(line.split() for line in (CGROUP / "cpu.stat").read_text().splitlines())
    main = subprocess.run(["systemctl", "show", "-P", "MainPID", "edged"], capture_output=True, text=True,
                          check=True).stdout.strip()
    fields = Path(f"/proc/{main}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    print(json.dumps({"usage_usec": int(stat["usage_usec"]),
                      "daemon_usec": (int(fields[11]) + int(fields[12])) * 1_000_000 // tick}))


def bench(model: str, n: int) -> None:
    """Median invoke time (ms) of the plain interpreter on a zero input: how fast this CPU is."""
    import time

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=model, num_threads=1)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    interp.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        interp.invoke()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"invoke_ms": round(sorted(times)[n // 2] * 1e3, 2)}))


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


def refused(trace: str, attached: bool) -> None:
    """What a worker did under its filter, from an strace -f.

    attached: strace -f -p WORKER, started after the worker was ready: every
    line is the worker's (all its threads), under the filter. Otherwise a trace
    that caught the worker's spawn: the worker is the process whose
    seccomp(SECCOMP_SET_MODE_FILTER) returned 0; its later lines and its
    threads' ran under the filter.
    """
    import re

    import pyseccomp

    from edged import sandbox

    line_re = re.compile(r"^(\d+)\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]")
    allowed = set(sandbox.allowed_syscalls())
    leader: dict[int, int] = {}   # thread id -> the process it belongs to (CLONE_THREAD)
    pending: set[int] = set()     # pids inside an unfinished clone(CLONE_THREAD)
    worker = None
    counts: dict[str, int] = {}
    killed: list[str] = []
    for line in open(trace, errors="replace"):
        if "SIGSYS" in line and worker is not None:
            pm = re.match(r"^(\d+)\s", line)
            if pm and (attached or leader.get(int(pm.group(1)), int(pm.group(1))) == worker):
                killed.append(line.strip())
        m = line_re.match(line)
        if not m:
            continue
        pid, name = int(m.group(1)), m.group(2)
        ret = re.search(r"= (\d+)$", line.rstrip())
        if name == "clone" and "resumed>" not in line and "CLONE_THREAD" in line:
            if ret:
                leader[int(ret.group(1))] = leader.get(pid, pid)
            else:
                pending.add(pid)
        elif name == "clone" and "resumed>" in line and pid in pending and ret:
            pending.discard(pid)
            leader[int(ret.group(1))] = leader.get(pid, pid)
        if worker is None and attached:
            worker = pid  # strace -p attached to one worker: every line (thread) is the worker's
        if worker is None:
            if name == "seccomp" and "SECCOMP_SET_MODE_FILTER" in line and line.rstrip().endswith("= 0"):
                worker = leader.get(pid, pid)
            continue
        if not attached and leader.get(pid, pid) != worker:
            continue
        if "resumed>" not in line:
            counts[name] = counts.get(name, 0) + 1
    names = set(sandbox.allowed_syscalls()) | set(sandbox.BATCH_EXTRA) | set(sandbox.GPU_EXTRA)
    # names of the tables that are no syscall on this arch (libseccomp gives a negative pseudo number)
    pseudo = sorted(n for n in names if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, n) < 0)
    print(json.dumps({"worker": worker, "used": counts, "refused": sorted(n for n in counts if n not in allowed),
                      "sigsys": killed, "allowed_unused": sorted(allowed - set(counts)),
                      "not_on_this_arch": pseudo, "arch": os.uname().machine}))


def main(argv: list[str]) -> None:
    cmd = argv[0] if argv else ""
    if cmd == "reference":
        reference(argv[1], int(argv[2]), argv[3:])
    elif cmd == "pss":
        pss()
    elif cmd == "cpu":
        cpu()
    elif cmd == "bench":
        bench(argv[1], int(argv[2]))
    elif cmd == "forbidden":
        forbidden()
    elif cmd == "refused":
        refused(argv[-1], attached="--attached" in argv)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
