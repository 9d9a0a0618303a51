"""`edged bench`: every serving path against the raw interpreter, in one run.

(a) raw:        the interpreter's own invoke loop, input set once
(b) inproc:     the worker path in this process (fill input from the frame, invoke, postprocess, JSON)
(c) worker:     a real worker subprocess fed through the shared-memory pool, sandbox off
(d) sandboxed:  the same with the seccomp sandbox on (what `edged run` does)
(e) e2e:        publisher -> Mosquitto -> edged run -> subscriber, frames in flight
Same model, same threads, same frame. Reported: throughput, p50/p95/p99
latency, CPU time per frame, and each throughput as a ratio of (a).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil

from edged.config import Config


@dataclasses.dataclass
class Run:
    name: str
    frames: int
    wall_s: float
    latencies_ms: list[float]
    cpu_s: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def summary(self, base_fps: float | None) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)
        fps = self.frames / self.wall_s if self.wall_s else 0.0

        def pct(q: float) -> float:
            return round(lat[min(len(lat) - 1, int(q / 100 * len(lat)))], 3) if lat else 0.0

        return {"fps": round(fps, 1), "ms_per_frame": round(1e3 / fps, 3) if fps else None,
                "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
                "cpu_ms_per_frame": round(self.cpu_s / self.frames * 1e3, 3) if self.frames else None,
                "ratio_vs_raw": round(fps / base_fps, 3) if base_fps else 1.0, **self.extra}


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system + getattr(t, "children_user", 0) * 0
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


def _timed(name: str, frames: int, step: Callable[[], None], pids: list[int]) -> Run:
    lats = []
    c0, t0 = _cpu(pids), time.perf_counter()
    for _ in range(frames):
        s = time.perf_counter()
        step()
        lats.append((time.perf_counter() - s) * 1e3)
    return Run(name, frames, time.perf_counter() - t0, lats, _cpu(pids) - c0)


def bench_frame(cfg: Config, model_input: tuple[tuple[int, ...], str]) -> bytes:
    """A raw tensor frame of the model's input size (no decode: the comparison is about the path)."""
    shape, dtype = model_input
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=shape).astype(dtype).tobytes()


def run_raw(cfg: Config, frames: int, payload: bytes) -> Run:
    from edged import runtime

    mod = runtime.backend_module()
    interp = mod.Interpreter(model_path=cfg.model.path, num_threads=cfg.model.threads)
    interp.allocate_tensors()
    d = interp.get_input_details()[0]
    interp.set_tensor(d["index"], np.frombuffer(payload, d["dtype"]).reshape(d["shape"]))
    for _ in range(10):
        interp.invoke()
    return _timed("raw", frames, interp.invoke, [os.getpid()])


def run_inproc(cfg: Config, frames: int, payload: bytes) -> Run:
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
        if cfg.model.task == "classify":
            body = postprocess.classify(model, labels, cfg.model.top_k)
        elif cfg.model.task == "detect":
            body = postprocess.detect(model, labels, cfg.model.score_threshold, det)  # type: ignore[arg-type]
        else:
            body = postprocess.raw(model)
        json.dumps(body)

    for _ in range(10):
        step()
    return _timed("inproc", frames, step, [os.getpid()])


def run_worker(cfg: Config, frames: int, payload: bytes, sandbox: bool, inflight: int = 2) -> Run:
    """Frames through a real worker process and the pool, `inflight` at a time, as the dispatcher does."""
    from edged.pool import FramePool
    from edged.workers import WorkerHandle

    done = threading.Condition()
    finished: dict[int, float] = {}

    def on_message(h: WorkerHandle, msg: dict[str, Any]) -> None:
        if msg.get("t") == "r":
            with done:
                finished[int(msg["s"])] = time.perf_counter()
                done.notify_all()

    init = {"t": "init", "config_text": Path(cfg.source).read_text(), "config_name": cfg.source,
            "config_base": str(Path(cfg.source).resolve().parent), "sandbox": sandbox,
            "sandbox_mode": cfg.sandbox.mode, "memory_limit": cfg.sandbox.memory_limit_mb << 20,
            "model_path": cfg.model.path, "log_level": 30}
    h = WorkerHandle(0, init, on_message, lambda _h: None)
    pool = FramePool(initial_bytes=max(1 << 20, 4 * len(payload)))
    try:
        h.start()
        segs = {sid: (fd, size) for sid, fd, size in pool.segments()}
        started: dict[int, float] = {}
        blocks = {}

        def submit(seq: int) -> None:
            b = pool.write(payload)
            assert b is not None
            fd, size = segs.get(b.segment) or {sid: (fd, sz) for sid, fd, sz in pool.segments()}[b.segment]
            h.ensure_segment(b.segment, fd, size)
            blocks[seq] = b
            started[seq] = time.perf_counter()
            h.send({"t": "f", "s": seq, "g": b.segment, "o": b.offset, "n": len(payload), "c": None})

        def drive(n: int, base: int) -> None:
            nxt = base
            for _ in range(min(inflight, n)):
                submit(nxt)
                nxt += 1
            for seq in range(base, base + n):
                with done:
                    while seq not in finished:
                        done.wait(5)
                pool.free(blocks.pop(seq))
                if nxt < base + n:
                    submit(nxt)
                    nxt += 1

        drive(10, 0)
        pids = [os.getpid(), h.pid or 0]
        c0, t0 = _cpu(pids), time.perf_counter()
        drive(frames, 1000)
        wall = time.perf_counter() - t0
        cpu = _cpu(pids) - c0
        lats = [(finished[s] - started[s]) * 1e3 for s in range(1000, 1000 + frames)]
        return Run("sandboxed" if sandbox else "worker", frames, wall, lats, cpu)
    finally:
        h.stop()
        pool.close()


def run_e2e(cfg: Config, frames: int, payload: bytes, window: int = 4) -> Run | str:
    """Publisher -> Mosquitto -> `edged run` -> subscriber, `window` frames in flight."""
    mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.path.exists(mosq):
        return "skipped: mosquitto not installed"
    import paho.mqtt.client as paho
    import yaml
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    tmp = Path(tempfile.mkdtemp(prefix="edged-bench-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp / "m.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
                                "max_queued_messages 100000\n")
    broker = subprocess.Popen([mosq, "-c", str(tmp / "m.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    raw_cfg = yaml.safe_load(Path(cfg.source).read_text()) or {}
    raw_cfg.setdefault("mqtt", {}).update({"host": "127.0.0.1", "port": port, "topic_prefix": "bench/{device_id}",
                                           "share": None})
    raw_cfg.setdefault("model", {}).update({"path": cfg.model.path, "labels": cfg.model.labels})
    raw_cfg["device_id"] = "bench"
    raw_cfg.setdefault("status", {}).update({"socket": str(tmp / "s.sock"), "interval": 0,
                                             "prometheus_file": None})
    (tmp / "c.yaml").write_text(yaml.safe_dump(raw_cfg))
    t_launch = time.perf_counter()
    daemon = subprocess.Popen([sys.executable, "-m", "edged", "run", "-c", str(tmp / "c.yaml")],
                              stdout=subprocess.DEVNULL, stderr=open(tmp / "daemon.log", "w"))
    got: dict[str, float] = {}
    cv = threading.Condition()
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)

    def on_connect(cl: Any, *a: Any) -> None:
        cl.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_message(cl: Any, u: Any, msg: Any) -> None:
        if msg.topic.endswith("/status"):
            with cv:
                got["_state"] = 1.0 if b'"online"' in msg.payload else 0.0
                cv.notify_all()
            return
        fid = json.loads(msg.payload)["frame_id"]
        with cv:
            got[fid] = time.perf_counter()
            cv.notify_all()

    c.on_connect, c.on_message = on_connect, on_message
    try:
        from edged.status import query

        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        c.connect("127.0.0.1", port)
        c.subscribe([("bench/bench/out/#", 1), ("bench/bench/status", 1)])
        c.loop_start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if query(str(tmp / "s.sock"), 2).get("state") == "online":
                    break
            except Exception:  # not listening yet
                pass
            time.sleep(0.01)
        cold_start_s = time.perf_counter() - t_launch
        sent: dict[str, float] = {}

        def send(i: int) -> None:
            p = Properties(PacketTypes.PUBLISH)
            p.UserProperty = [("frame_id", str(i))]
            sent[str(i)] = time.perf_counter()
            c.publish("bench/bench/in/b", payload, qos=1, properties=p)

        def drive(n: int, base: int) -> None:
            nxt = base
            for _ in range(min(window, n)):
                send(nxt)
                nxt += 1
            for i in range(base, base + n):
                with cv:
                    end = time.monotonic() + 30
                    while str(i) not in got and time.monotonic() < end:
                        cv.wait(1)
                if nxt < base + n:
                    send(nxt)
                    nxt += 1

        drive(20, 0)
        workers = [p.pid for p in psutil.Process(daemon.pid).children()]
        pids = [os.getpid(), daemon.pid, broker.pid, *workers]
        c0, t0 = _cpu(pids), time.perf_counter()
        drive(frames, 100000)
        wall = time.perf_counter() - t0
        cpu = _cpu(pids) - c0
        ids = [str(i) for i in range(100000, 100000 + frames)]
        missing = [i for i in ids if i not in got]
        if missing:
            return f"failed: {len(missing)} frames unanswered (log {tmp / 'daemon.log'})"
        run = Run("e2e", frames, wall, [(got[i] - sent[i]) * 1e3 for i in ids], cpu)
        run.extra = {"cold_start_s": round(cold_start_s, 3), **_footprint(daemon.pid)}
        return run
    finally:
        c.loop_stop()
        c.disconnect()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(20)
        except subprocess.TimeoutExpired:
            daemon.kill()
        broker.terminate()
        broker.wait(5)


def run_bench(cfg: Config, frames: int = 200, with_e2e: bool = True) -> dict[str, Any]:
    from edged import runtime

    m = runtime.Model(cfg.model.path, threads=cfg.model.threads)
    payload = bench_frame(cfg, (m.input.shape, m.input.dtype))
    del m
    runs: list[Run | tuple[str, str]] = []
    raw = run_raw(cfg, frames, payload)
    runs.append(raw)
    runs.append(run_inproc(cfg, frames, payload))
    runs.append(run_worker(cfg, frames, payload, sandbox=False))
    runs.append(run_worker(cfg, frames, payload, sandbox=True))
    if with_e2e:
        e = run_e2e(cfg, frames, payload)
        runs.append(e if isinstance(e, Run) else ("e2e", e))
    base = raw.frames / raw.wall_s
    paths: dict[str, Any] = {}
    for r in runs:
        paths[r.name if isinstance(r, Run) else r[0]] = r.summary(base) if isinstance(r, Run) else {"note": r[1]}
    report: dict[str, Any] = {"model": cfg.model.path, "threads": cfg.model.threads, "frames": frames,
                              "frame_bytes": len(payload), "paths": paths}
    if "worker" in paths and "sandboxed" in paths and "fps" in paths["sandboxed"]:
        report["sandbox_vs_worker"] = round(paths["sandboxed"]["fps"] / paths["worker"]["fps"], 3)
    if "e2e" in paths and "fps" in paths["e2e"]:
        report["e2e_added_ms_per_frame"] = round(paths["e2e"]["ms_per_frame"] - paths["raw"]["ms_per_frame"], 3)
    lines = [f"edged bench: {Path(cfg.model.path).name}, {cfg.model.threads} thread(s), {frames} frames of "
             f"{len(payload)} bytes (raw tensor)",
             f"{'path':<10} {'fps':>8} {'ms/frame':>9} {'p50':>8} {'p95':>8} {'p99':>8} {'cpu ms/f':>9} {'vs raw':>7}"]
    for name, s in paths.items():
        if "fps" in s:
            lines.append(f"{name:<10} {s['fps']:>8} {s['ms_per_frame']:>9} {s['p50_ms']:>8} {s['p95_ms']:>8} "
                         f"{s['p99_ms']:>8} {s['cpu_ms_per_frame']:>9} {s['ratio_vs_raw']:>7}")
        else:
            lines.append(f"{name:<10} {s['note']}")
    if "e2e" in paths and "cold_start_s" in paths["e2e"]:
        e = paths["e2e"]
        lines.append(f"footprint: supervisor {e['supervisor_pss_mb']} MiB, workers {e['workers_pss_mb']} MiB "
                     f"(PSS), total {e['total_pss_mb']} MiB; cold start to online {e['cold_start_s']} s")
    for k in ("sandbox_vs_worker", "e2e_added_ms_per_frame"):
        if k in report:
            lines.append(f"{k}: {report[k]}")
    report["text"] = "\n".join(lines)
    return report
