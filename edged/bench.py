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
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable

import numpy as np

from edged.benchpaths import BenchPath, Stats, Windowed, _cpu, _footprint
from edged.config import Config
from edged.errors import UnavailableError


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
