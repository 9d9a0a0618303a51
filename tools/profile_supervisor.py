"""Where the supervisor's time goes: py-spy on the daemon of an `edged bench` run, summed by module.

    .venv/bin/python tools/profile_supervisor.py -c v1.yaml [--frames 20000] [--seconds 110] [--gil]

Runs `edged bench -c CONFIG --frames N` and attaches `py-spy record --format raw` to the bench's
daemon (`edged run -c /tmp/edged-bench-*`) for --seconds (or until the bench ends), idle samples
left out. --gil samples only the thread holding the GIL: Python's own CPU; without it, every busy
thread, system calls included (a send() on loopback TCP does the receiver's work in the caller's
time). Prints the share of the samples by module (paho counted as one) and the top leaf
functions. py-spy: --py-spy, else `py-spy` beside this Python or on PATH (`pip install py-spy`);
it needs ptrace (root, or kernel.yama.ptrace_scope 0).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def find_daemon(bench: subprocess.Popen[bytes], timeout: float) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end and bench.poll() is None:
        for p in psutil.Process(bench.pid).children(recursive=True):
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "run" in cmd and any(a.startswith(tempfile.gettempdir() + "/edged-bench") for a in cmd):
                return p.pid
        time.sleep(0.05)
    raise SystemExit("the bench's daemon did not start")


def summarize(raw: Path, top: int) -> str:
    by_module: collections.Counter[str] = collections.Counter()
    by_leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        leaf = stack.split(";")[-1]
        total += int(n)
        by_leaf[leaf] += int(n)
        m = re.search(r"\((.*?):\d+\)", leaf)
        f = m.group(1) if m else leaf
        key = "paho" if "paho/" in f else ("edged/" + f.split("/edged/")[-1] if "/edged/" in f else Path(f).name)
        by_module[key] += int(n)
    if not total:
        return "no busy samples (was the daemon idle the whole time?)"
    out = [f"{total} busy samples", "by module:"]
    out += [f"  {100 * v / total:5.1f} %  {k}" for k, v in by_module.most_common(top)]
    out.append("by leaf function:")
    out += [f"  {100 * v / total:5.1f} %  {k[:140]}" for k, v in by_leaf.most_common(top)]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--seconds", type=float, default=110.0)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--py-spy", dest="py_spy")
    ap.add_argument("--raw", type=Path, help="keep py-spy's raw stacks here")
    a = ap.parse_args()
    spy = a.py_spy or (str(Path(sys.executable).with_name("py-spy"))
                       if Path(sys.executable).with_name("py-spy").exists() else shutil.which("py-spy"))
    if not spy:
        print("py-spy not found: pip install py-spy, or --py-spy PATH", file=sys.stderr)
        return 2
    edged = [sys.executable, "-m", "edged", "bench", "-c", a.config, "--frames", str(a.frames)]
    with tempfile.TemporaryDirectory() as tmp:
        raw = a.raw or Path(tmp) / "stacks.txt"
        bench = subprocess.Popen(edged, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)))
        try:
            pid = find_daemon(bench, 60.0)
            cmd = [spy, "record", "--pid", str(pid), "--duration", str(int(a.seconds)), "--rate", str(a.rate),
                   "--format", "raw", "--output", str(raw), "--nonblocking", *(["--gil"] if a.gil else [])]
            subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            bench.wait()  # the bench stops its own daemon and broker: let it finish
        if not raw.exists():
            print("py-spy wrote nothing (ptrace refused?)", file=sys.stderr)
            return 1
        print(f"supervisor pid {pid}, {'GIL holder' if a.gil else 'busy threads'}, {a.seconds:.0f} s of "
              f"`{' '.join(edged[1:])}`")
        print(summarize(raw, a.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
