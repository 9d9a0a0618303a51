"""The bench's measuring frame: a path kept up for the run, what it accumulates, and the windowed driver.

edged.bench (raw, inproc, worker, sandboxed), edged.bench_e2e and edged.bench_open all measure through
these; they live apart from edged.bench so the end-to-end paths need not import it (no import cycle).
"""
from __future__ import annotations

import threading
import time
from typing import Any

import psutil


class Stats:
    """Accumulated measurements of one path over all rounds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.frames = 0
        self.wall_s = 0.0
        self.cpu_s = 0.0
        self.latencies_ms: list[float] = []
        self.extra: dict[str, Any] = {}

    def summary(self, base: Stats | None) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        fps = self.frames / self.wall_s if self.wall_s else 0.0

        def pct(q: float) -> float:
            return round(lat[min(len(lat) - 1, int(q / 100 * len(lat)))], 3) if lat else 0.0

        cpu = self.cpu_s / self.frames * 1e3 if self.frames else 0.0
        out = {"fps": round(fps, 1), "ms_per_frame": round(1e3 / fps, 3) if fps else None,
               "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "cpu_ms_per_frame": round(cpu, 3)}
        if base is not None and base.frames:
            out["ratio_vs_raw"] = round(fps / (base.frames / base.wall_s), 3)
            out["cpu_ratio_vs_raw"] = round(cpu / (base.cpu_s / base.frames * 1e3), 3) if base.cpu_s else None
        return {**out, **self.extra}


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _footprint(pid: int) -> dict[str, Any]:
    """PSS (RSS where PSS is unreadable) of the supervisor and its workers, in MiB."""
    def mem(p: psutil.Process) -> float:
        try:
            info = p.memory_full_info()
            return round(getattr(info, "pss", info.rss) / (1 << 20), 1)
        except psutil.Error:
            return round(p.memory_info().rss / (1 << 20), 1)

    sup = psutil.Process(pid)
    workers = [mem(c) for c in sup.children()]
    return {"supervisor_pss_mb": mem(sup), "workers_pss_mb": workers,
            "total_pss_mb": round(mem(sup) + sum(workers), 1)}


class BenchPath:
    """A serving path kept up for the whole run; measure(n) pushes n frames through it."""

    name = "?"
    pids: list[int]

    def measure(self, n: int, into: Stats) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Windowed(BenchPath):
    """Keeps `window` frames in flight: submit(seq) starts one, completion is signalled by done(seq).

    The next frame is submitted from the thread that reports a completion, as a pipelining
    client does: no hop through the measuring thread per frame, whose wake-ups would be charged
    to the path (on 2 cores they were ~0.2 ms of CPU per frame end to end).
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.cv = threading.Condition()
        self.finished: dict[int, float] = {}
        self.started: dict[int, float] = {}
        self.next_seq = 0
        self.dead = ""
        self._nxt = 0
        self._end = 0
        self._left = 0

    def submit(self, seq: int) -> None:
        raise NotImplementedError

    def retire(self, seq: int) -> None:
        pass

    def done(self, seq: int) -> None:
        nxt = -1
        with self.cv:
            self.finished[seq] = time.perf_counter()
            if self._nxt < self._end:
                nxt, self._nxt = self._nxt, self._nxt + 1
                self.started[nxt] = time.perf_counter()
            self._left -= 1
            if self._left <= 0:
                self.cv.notify_all()
        self.retire(seq)
        if nxt >= 0:
            self.submit(nxt)

    def measure(self, n: int, into: Stats | None = None) -> None:
        base = self.next_seq
        self.next_seq += n
        first = min(self.window, n)
        with self.cv:
            self._nxt, self._end, self._left = base + first, base + n, n
        c0, t0 = _cpu(self.pids), time.perf_counter()
        for seq in range(base, base + first):
            self.started[seq] = time.perf_counter()
            self.submit(seq)
        with self.cv:
            limit = 30 + n * 0.1
            end = time.monotonic() + limit
            while self._left > 0:
                if self.dead:
                    raise RuntimeError(f"bench path {self.name}: {self.dead} with {self._left} frame(s) unanswered")
                if time.monotonic() > end:
                    raise RuntimeError(f"bench path {self.name}: {self._left} frame(s) unanswered after "
                                       f"{limit:.0f} s")
                self.cv.wait(1)
        if into is not None:
            into.wall_s += time.perf_counter() - t0
            into.cpu_s += _cpu(self.pids) - c0
            into.frames += n
            into.latencies_ms.extend((self.finished[s] - self.started[s]) * 1e3 for s in range(base, base + n))
