"""`edged bench`: every serving path against the raw interpreter, in one run.

(a) raw:        the interpreter's own invoke loop, input set once
(b) inproc:     the worker path in this process (fill input from the frame, invoke, postprocess, JSON)
(c) worker:     a real worker subprocess fed through the shared-memory pool, sandbox off
(d) sandboxed:  the same with the seccomp sandbox on (what `edged run` does)
(e) e2e:        publisher -> Mosquitto -> `edged run` -> subscriber, frames in flight (edged.bench_e2e);
                then open loop: frames at a fixed rate, 25-100 % of its capacity (edged.bench_open)
With model.batch_max > 1 also: raw_batch (the invoke loop at that batch
size) and e2e_nobatch (e2e with batching off, same window), for the gain.
Same model, threads and frame for all. The paths stay up for the whole run
and are measured in interleaved rounds, so drift of a shared machine hits
them alike. Reported: throughput, p50/p95/p99 latency, CPU time per frame
(all processes of the path), each as a ratio of (a); footprint (PSS) and
cold start of the daemon.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np
import psutil

from edged.config import Config
from edged.errors import UnavailableError


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


class Serial(BenchPath):
    """A path that runs one frame at a time in this process."""

    def __init__(self, name: str, step: Callable[[], None]) -> None:
        self.name, self.step, self.pids = name, step, [os.getpid()]

    def measure(self, n: int, into: Stats) -> None:
        c0, t0 = _cpu(self.pids), time.perf_counter()
        for _ in range(n):
            s = time.perf_counter()
            self.step()
            into.latencies_ms.append((time.perf_counter() - s) * 1e3)
        into.wall_s += time.perf_counter() - t0
        into.cpu_s += _cpu(self.pids) - c0
        into.frames += n


def raw_path(cfg: Config, payload: bytes) -> Serial:
    """The bare invoke loop of what serves the model: LiteRT's CompiledModel on a GPU, else the interpreter."""
    from edged import accel, runtime

    if cfg.accelerator.prefer and cfg.accelerator.prefer[0] == "gpu":
        model = accel.choose(cfg).model
        if isinstance(model, runtime.GpuModel):
            model.set_input(np.frombuffer(payload, model.input.dtype).reshape(model.input.shape))
            model.invoke()
            return Serial("raw", model.run_bare)
    interp = runtime.backend_module().Interpreter(model_path=cfg.model.path, num_threads=cfg.model.threads)
    interp.allocate_tensors()
    d = interp.get_input_details()[0]
    interp.set_tensor(d["index"], np.frombuffer(payload, d["dtype"]).reshape(d["shape"]))
    return Serial("raw", interp.invoke)


class RawBatch(BenchPath):
    """The bare invoke loop with `batch` frames per invoke (model.batch_max on a resizable-batch model)."""

    def __init__(self, cfg: Config, payload: bytes, batch: int) -> None:
        from edged import runtime

        self.name, self.batch, self.pids = "raw_batch", batch, [os.getpid()]
        self.model = runtime.Model(cfg.model.path, threads=cfg.model.threads)
        why = self.model.batch_refusal(batch)
        if why:
            raise RuntimeError(why)
        self.model.set_batch(batch)
        one = np.frombuffer(payload, self.model.input.dtype).reshape(self.model.input.shape)
        self.model.set_input(np.concatenate([one] * batch))

    def measure(self, n: int, into: Stats) -> None:
        steps = max(1, n // self.batch)
        c0, t0 = _cpu(self.pids), time.perf_counter()
        for _ in range(steps):
            s = time.perf_counter()
            self.model.invoke()
            into.latencies_ms.extend([(time.perf_counter() - s) * 1e3] * self.batch)
        into.wall_s += time.perf_counter() - t0
        into.cpu_s += _cpu(self.pids) - c0
        into.frames += steps * self.batch


def inproc_path(cfg: Config, payload: bytes) -> Serial:
    from edged import accel, postprocess, preprocess

    model = accel.choose(cfg).model
    model.warm_up()
    pre = preprocess.Preprocessor(model.input, cfg.model.mean, cfg.model.std)
    labels = postprocess.load_labels(cfg.model.labels)
    view = memoryview(payload)
    det = postprocess.detection_outputs(model) if cfg.model.task == "detect" else None

    def step() -> None:
        dst = model.input_view()
        pre.fill(dst, view)
        del dst
        model.invoke()
        m = cfg.model
        json.dumps(postprocess.body(model, m.task, labels, m.top_k, m.score_threshold, det))

    return Serial("inproc", step)


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


class WorkerPath(Windowed):
    """Frames through a real worker process and the pool, as the dispatcher hands them over."""

    def __init__(self, cfg: Config, payload: bytes, sandbox: bool, window: int) -> None:
        from edged.pool import FramePool
        from edged.workerinit import init_message, read_config_text
        from edged.workers import WorkerHandle

        super().__init__(window)
        self.name = "sandboxed" if sandbox else "worker"
        self.payload = payload
        init = init_message(cfg, read_config_text(cfg), cfg.coral_device(0), sandbox=sandbox, model_path=cfg.model.path)
        self.h = WorkerHandle(0, init, self._on_message, self._on_exit)
        self.pool = FramePool(initial_bytes=max(1 << 20, 8 * len(payload)))
        self.leases: dict[int, Any] = {}
        self.h.start()
        self.pids = [os.getpid(), self.h.pid or 0]

    def _on_exit(self, h: Any) -> None:
        with self.cv:
            self.dead = f"worker {h.exit_description()}"
            self.cv.notify_all()

    def _on_message(self, h: Any, msg: Any) -> None:
        from edged.protocol import Result

        if isinstance(msg, Result):
            self.done(msg.seq)

    def submit(self, seq: int) -> None:
        lease = self.pool.lease(self.payload)
        assert lease is not None and lease.block is not None
        self.leases[seq] = lease
        self.h.send_frame(seq, self.pool, lease.block, len(self.payload))

    def retire(self, seq: int) -> None:
        self.leases.pop(seq).release()

    def close(self) -> None:
        self.h.stop()
        self.pool.close()


def run_bench(cfg: Config, frames: int = 200, with_e2e: bool = True, rounds: int = 5,
              window: int = 2, open_loop_s: float = 2.0) -> dict[str, Any]:
    from edged import runtime

    m = runtime.Model(cfg.model.path, threads=cfg.model.threads)
    rng = np.random.default_rng(0)
    payload = rng.integers(0, 255, size=m.input.shape).astype(m.input.dtype).tobytes()
    del m
    from edged.bench_e2e import E2EPath  # it imports this module's paths

    paths: list[BenchPath] = []
    notes: dict[str, str] = {}
    try:
        paths += [raw_path(cfg, payload), inproc_path(cfg, payload),
                  WorkerPath(cfg, payload, sandbox=False, window=window),
                  WorkerPath(cfg, payload, sandbox=True, window=window)]
        batch = cfg.model.batch_max
        if batch > 1:
            try:
                paths.append(RawBatch(cfg, payload, batch))
            except RuntimeError as exc:
                notes["raw_batch"] = f"skipped: batching off: {exc}"
                batch = 1
        if with_e2e:
            # batching needs frames waiting: both e2e paths get the same, wider window
            e2e_window = max(window, 2 * batch)
            try:
                paths.append(E2EPath(cfg, payload, window=e2e_window))
                if batch > 1:
                    paths.append(E2EPath(cfg, payload, window=e2e_window, name="e2e_nobatch",
                                         model_overrides={"batch_max": 1}))
            except (RuntimeError, UnavailableError) as exc:
                notes["e2e"] = f"skipped: {exc}"
        stats = {p.name: Stats(p.name) for p in paths}
        for p in paths:  # warm-up
            p.measure(10, Stats("warm-up"))
        per_round = max(1, frames // rounds)
        for _ in range(rounds):
            for p in paths:
                p.measure(per_round, stats[p.name])
        e2e = next((p for p in paths if isinstance(p, E2EPath) and p.name == "e2e"), None)
        curve: list[dict[str, Any]] = []
        if e2e is not None:
            stats["e2e"].extra = {"cold_start_s": e2e.cold_start_s, **_footprint(e2e.daemon.pid)}
            from edged.bench_open import load_curve

            s = stats["e2e"]
            curve = load_curve(e2e, s.frames / s.wall_s, seconds=open_loop_s)
    finally:
        for p in paths:
            p.close()
    base = stats["raw"]
    report: dict[str, Any] = {
        "model": cfg.model.path,
        "threads": cfg.model.threads,
        "frames_per_path": per_round * rounds,
        "rounds": rounds,
        "in_flight": window,
        "in_flight_e2e": max(window, 2 * batch) if with_e2e else None,
        "frame_bytes": len(payload),
        "paths": {n: s.summary(base) for n, s in stats.items()},
        "notes": notes,
    }
    P = report["paths"]
    if "worker" in P and "sandboxed" in P:
        report["sandboxed_vs_worker"] = round(P["sandboxed"]["fps"] / P["worker"]["fps"], 3)
        report["sandboxed_vs_inproc"] = round(P["sandboxed"]["fps"] / P["inproc"]["fps"], 3)
    if "raw_batch" in P:
        report["batch_max"] = batch
        report["batch_gain_raw"] = round(P["raw_batch"]["fps"] / P["raw"]["fps"], 3)
    if "e2e_nobatch" in P:
        report["batch_gain_e2e"] = round(P["e2e"]["fps"] / P["e2e_nobatch"]["fps"], 3)
    if curve:
        report["open_loop_e2e"] = curve
    if "e2e" in P:
        report["e2e_vs_raw"] = P["e2e"]["ratio_vs_raw"]
        report["e2e_added_ms_per_frame"] = round(P["e2e"]["ms_per_frame"] - P["raw"]["ms_per_frame"], 3)
    lines = [f"edged bench: {Path(cfg.model.path).name}, {cfg.model.threads} thread(s), {per_round * rounds} frames "
             f"per path in {rounds} interleaved rounds, {window} in flight, {len(payload)}-byte raw tensor frames",
             f"{'path':<11} {'fps':>8} {'ms/frame':>9} {'p50':>8} {'p95':>8} {'p99':>8} {'cpu ms/f':>9} "
             f"{'fps/raw':>8} {'cpu/raw':>8}"]
    for name, s in P.items():
        lines.append(f"{name:<11} {s['fps']:>8} {s['ms_per_frame']:>9} {s['p50_ms']:>8} {s['p95_ms']:>8} "
                     f"{s['p99_ms']:>8} {s['cpu_ms_per_frame']:>9} {s.get('ratio_vs_raw', 1.0):>8} "
                     f"{s.get('cpu_ratio_vs_raw', 1.0)!s:>8}")
    for name, note in notes.items():
        lines.append(f"{name:<10} {note}")
    if "e2e" in P and "cold_start_s" in P["e2e"]:
        e = P["e2e"]
        lines.append(f"footprint: supervisor {e['supervisor_pss_mb']} MiB, workers {e['workers_pss_mb']} MiB "
                     f"(PSS), total {e['total_pss_mb']} MiB; cold start to online {e['cold_start_s']} s")
    for row in curve:
        lines.append(f"open loop e2e at {row['load']:.0%} of capacity ({row['rate_fps']} fps, achieved "
                     f"{row['achieved_fps']}): p50 {row['p50_ms']} p95 {row['p95_ms']} p99 {row['p99_ms']} ms "
                     f"(raw p99 {P['raw']['p99_ms']} ms)")
    for k in ("sandboxed_vs_worker", "sandboxed_vs_inproc", "e2e_vs_raw", "e2e_added_ms_per_frame",
              "batch_max", "batch_gain_raw", "batch_gain_e2e"):
        if k in report:
            lines.append(f"{k}: {report[k]}")
    report["text"] = "\n".join(lines)
    return report
