"""The supervisor: admission, dispatch, results, worker supervision, lifecycle.

Threads: one I/O thread (edged.ioloop) drives paho and every worker channel:
admit() copies a frame into a pool block and hands it to a free worker at
once, _on_worker_message() publishes its result, with no hand-off between
threads on that path. A dispatcher thread is the fallback for frames that
waited for a worker (a restart, a reload); the main thread runs timers
(deadlines, heartbeats, restarts, pool upkeep, stats, watchdog) and handles
signals, which only set flags and write to a wake pipe. One Condition guards
queues, in-flight maps and worker slots. paho is never called with that lock
held.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from edged import __version__, config, heap
from edged.errors import ConfigError, EdgedError, ModelError, WorkerError
from edged.homeassistant import HomeAssistant
from edged.ioloop import IoLoop
from edged.metrics import Metrics, write_prometheus
from edged.mqtt import Incoming, MqttLink
from edged.notify import Notifier
from edged.pool import Block, FramePool
from edged.status import StatusServer
from edged.supervision import Slot, Supervision
from edged.workers import WorkerHandle

logger = logging.getLogger(__name__)

EX_OK, EX_SOFTWARE, EX_CONFIG = 0, 70, 78



@dataclass(slots=True, eq=False)
class Frame:
    seq: int
    stream: str
    out_topic: str
    length: int
    frame_id: str
    correlation: bytes | None
    content_type: str | None
    mid: int
    qos: int
    t_in: float
    expires_at: float | None
    block: Block | None = None
    t_dispatch: float = 0.0
    error_code: str = "worker_crashed"




def cfg_needs_prometheus(cfg: config.Config) -> bool:
    """True when Prometheus output is configured but its library is missing."""
    if not cfg.status.prometheus_file and not cfg.status.prometheus_port:
        return False
    import importlib.util

    return importlib.util.find_spec("prometheus_client") is None


class Supervisor(Supervision):
    def __init__(self, cfg: config.Config, env: dict[str, str] | None = None) -> None:
        heap.pin_mmap_threshold()
        self.cfg = cfg
        self.env = dict(os.environ if env is None else env)
        self.notifier = Notifier.from_env(self.env)
        self.metrics = Metrics()
        self.cond = threading.Condition()
        self.queues: dict[str, collections.deque[Frame]] = {}
        self.rr: collections.deque[str] = collections.deque()
        self.slots: list[Slot] = []
        self.generation = 0
        self.seq = 0
        self.state = "starting"
        self.started = time.monotonic()
        self.stopping = False
        self.fatal: str | None = None
        self._reload_requested = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        p = cfg.pool
        self.pool = FramePool(initial_bytes=int(p.initial_mb * (1 << 20)), max_bytes=int(p.max_mb * (1 << 20)),
                              segment_bytes=int(p.segment_mb * (1 << 20)), idle_release_s=p.idle_release_s,
                              frag_threshold=p.frag_threshold, on_segment_released=self._segment_released)
        # a frame the pool can never hold is too large, not a reason to drop the queue for it
        self.max_frame = min(cfg.queue.max_frame_bytes, int(p.max_mb * (1 << 20)))
        self.loop = IoLoop()
        self.link = MqttLink(cfg, self.admit, self._on_connection, loop=self.loop)
        self.ha = HomeAssistant(cfg, self.link.publish_message)  # HA hook 1/6: discovery and entity states
        self.link.add_route(self.ha.subscriptions(), self.ha.on_message)
        self.status_server = StatusServer(cfg.status.socket, self.snapshot)
        self.exporter: Any = None  # edged.prometheus.HttpExporter with status.prometheus_port
        self.model_info: dict[str, Any] = {}
        self.accel_info: dict[str, Any] = {}
        self._last_stats = 0.0
        self._last_watchdog = 0.0
        self._idle_since = self._last_trim = time.monotonic()
        self._trimmed_at_shrinks = 0

    # ---- worker lifecycle -------------------------------------------------
    # ---- admission and dispatch -------------------------------------------
    def _route(self, topic: str) -> tuple[str, str] | None:
        prefixes = [self.cfg.prefix]
        if self.cfg.mqtt.share is not None:
            prefixes.append(self.cfg.mqtt.share.prefix.rstrip("/"))
        for p in prefixes:
            if topic.startswith(p + "/in/"):
                stream = topic[len(p) + 4 :]
                return stream, f"{p}/out/{stream}"
        return None

    def admit(self, inc: Incoming) -> None:
        """Called on the I/O thread (paho's on_message): decide at once, never block."""
        route = self._route(inc.topic)
        if route is None or self.stopping:
            return  # not acknowledged: the broker redelivers it to the next start
        stream, out_topic = route
        now = time.monotonic()
        with self.cond:
            self.seq += 1
            seq = self.seq
        fid = inc.frame_id or (inc.correlation.hex() if inc.correlation else str(seq))
        refused = inc.response_topic is not None and self.ha.owns(inc.response_topic)  # HA hook 2/6
        f = Frame(seq, stream, out_topic if refused else inc.response_topic or out_topic, len(inc.payload), fid,
                  inc.correlation, inc.content_type, inc.mid, inc.qos, now, now + inc.expiry_s if inc.expiry_s else None)
        self.metrics.count("received")
        if refused:
            self._fail(f, "bad_request", "Response Topic is under the Home Assistant discovery prefix or P/ha/: "
                       "not allowed")
            return
        if len(inc.payload) > self.max_frame:
            self.metrics.count("too_large")
            self._fail(f, "too_large", f"payload of {len(inc.payload)} bytes exceeds {self.max_frame} "
                       "(queue.max_frame_bytes, and no more than pool.max_mb)")
            return
        # the one copy of the payload: into a pool block, now; the queue holds blocks, not bytes
        block = self.pool.write(inc.payload) if inc.payload else self.pool.alloc(1)
        victims: list[tuple[Frame, str]] = []
        with self.cond:
            q = self.queues.get(stream)
            if q is None:
                q = self.queues[stream] = collections.deque()
                self.rr.append(stream)
            drop_oldest = self.cfg.queue.policy == "drop_oldest"
            while block is None and drop_oldest and q:
                old = q.popleft()
                self._release(old)
                victims.append((old, "frame pool is full (pool.max_mb)"))
                block = self.pool.write(inc.payload) if inc.payload else self.pool.alloc(1)
            if block is None:
                victims.append((f, "frame pool is full (pool.max_mb)"))
            else:
                f.block = block
                if len(q) >= self.cfg.queue.max_per_stream:
                    why = f"queue for stream {stream!r} is full ({self.cfg.queue.max_per_stream} frames)"
                    victim = q.popleft() if drop_oldest else f
                    self._release(victim)
                    victims.append((victim, why))
                if f.block is not None:
                    q.append(f)
            # no notify: _dispatch_ready below hands the frame over from this thread; waking the
            # dispatcher for every frame cost it 4.5 context switches per frame, for nothing
        for victim, why in victims:
            self.metrics.count("dropped")
            self._fail(victim, "overloaded", f"{why}, policy {self.cfg.queue.policy}")
        self._dispatch_ready()

    def _release(self, frame: Frame) -> None:
        if frame.block is not None:
            self.pool.free(frame.block)
            frame.block = None

    def queue_depth(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def _pick(self) -> tuple[Frame, WorkerHandle] | None:
        """Under the lock: the next frame (streams in turn) and the least busy ready worker."""
        ready = [s.handle for s in self.slots if s.handle is not None and s.handle.state == "ready"
                 and len(s.handle.inflight) < s.handle.window]
        if not ready:
            return None
        for _ in range(len(self.rr)):
            stream = self.rr[0]
            self.rr.rotate(-1)
            q = self.queues[stream]
            if q:
                return q.popleft(), min(ready, key=lambda h: len(h.inflight))
        return None

    def _dispatch_loop(self) -> None:
        while True:
            with self.cond:
                while True:
                    if self.stopping and not self.queue_depth():
                        return
                    picked = self._pick()
                    if picked is not None:
                        break
                    self.cond.wait(0.5)
            if not self._dispatch_guarded(*picked):
                with self.cond:
                    self.cond.wait(0.05)  # the worker is going away: let its exit or restart settle

    def _dispatch_guarded(self, frame: Frame, worker: WorkerHandle) -> bool:
        """False when the frame went back to the head of its queue."""
        try:
            return self._dispatch(frame, worker)
        except Exception:  # top of a dispatch: answer the frame, keep serving
            logger.exception("dispatch of frame %s failed", frame.frame_id)
            self._fail(frame, "inference_failed", "internal error while dispatching the frame")
            return True

    def _dispatch_ready(self) -> None:
        """Hand queued frames to idle workers from the calling thread: no wake-up of the dispatcher on the hot path."""
        while not self.stopping:
            with self.cond:
                picked = self._pick()
            if picked is None:
                return
            if not self._dispatch_guarded(*picked):
                with self.cond:
                    self.cond.notify_all()  # never wait here (the I/O thread): the dispatcher retries
                return

    def _dispatch(self, frame: Frame, worker: WorkerHandle) -> bool:
        now = time.monotonic()
        if frame.expires_at is not None and now > frame.expires_at:
            self.metrics.count("expired")
            self._fail(frame, "expired", "message expiry passed before inference")
            return True
        block = frame.block
        assert block is not None
        seg = next(((fd, size) for sid, fd, size in self.pool.segments() if sid == block.segment), None)
        with self.cond:
            if worker.state != "ready" or seg is None:
                self.queues[frame.stream].appendleft(frame)
                return False
            frame.t_dispatch = now
            worker.inflight[frame.seq] = frame
        worker.ensure_segment(block.segment, *seg)
        worker.send({"t": "f", "s": frame.seq, "g": block.segment, "o": block.offset, "n": frame.length,
                     "c": frame.content_type})
        return True

    def _segment_released(self, seg_id: int) -> None:
        for s in list(self.slots):
            if s.handle is not None:
                s.handle.drop_segment(seg_id)

    # ---- results ------------------------------------------------------------
    def _on_worker_message(self, h: WorkerHandle, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "pong":
            h.last_pong = time.monotonic()
            return
        if t != "r":
            return
        with self.cond:
            frame = h.inflight.pop(msg.get("s"), None)  # type: ignore[arg-type]
            if self.stopping or h.retiring:  # a drain or a retirement waits for in-flight frames to end
                self.cond.notify_all()
        h.last_pong = time.monotonic()
        h.served += 1
        if int(msg.get("k", 1)) > 1:
            h.batched += 1
        if frame is None:
            return
        if frame.block is not None:
            self.pool.free(frame.block)
            frame.block = None
        self._dispatch_ready()  # keep the worker busy before we spend time publishing
        err = msg.get("e")
        if isinstance(err, dict):
            self._fail(frame, str(err.get("code", "inference_failed")), str(err.get("message", "")), h)
            return
        body = msg.get("b") if isinstance(msg.get("b"), dict) else {}
        now = time.monotonic()
        timing = {"queue": round((frame.t_dispatch - frame.t_in) * 1e3, 3), "preprocess": float(msg.get("p", 0)),
                  "inference": float(msg.get("i", 0)), "total": round((now - frame.t_in) * 1e3, 3)}
        result = {"frame_id": frame.frame_id, "stream": frame.stream, "model": h.model_name,
                  "accelerator": h.info.get("accelerator", {}).get("chosen"), "task": h.info.get("task"),
                  **body, "timing_ms": timing, "ts": round(time.time(), 3)}
        if self._publish(frame, result):
            timing["publish"] = round((time.monotonic() - now) * 1e3, 3)
            self.metrics.observe(timing)
            self.ha.on_result(result)  # HA hook 3/6: latest label of listed streams
        else:
            self.metrics.count("not_held")

    def _fail(self, frame: Frame, code: str, message: str, h: WorkerHandle | None = None) -> None:
        if frame.block is not None:
            self.pool.free(frame.block)
            frame.block = None
        self.metrics.error(code)
        result: dict[str, Any] = {"frame_id": frame.frame_id, "stream": frame.stream}
        name = h.model_name if h is not None else self.model_info.get("name")
        if name:
            result["model"] = name
        result["error"] = {"code": code, "message": message}
        result["ts"] = round(time.time(), 3)
        self._publish(frame, result)

    def _publish(self, frame: Frame, result: dict[str, Any]) -> bool:
        """Hand a result to the broker link and acknowledge its frame; False when it could not be held."""
        payload = json.dumps(result, separators=(",", ":")).encode()
        if self.link.publish(frame.out_topic, payload, correlation=frame.correlation):
            self.link.ack(frame.mid, frame.qos)
            return True
        if frame.qos:
            logger.warning("broker away and %d results already held (mqtt.result_buffer): frame %s stays "
                           "unacknowledged, the broker redelivers it", self.cfg.mqtt.result_buffer, frame.frame_id)
        else:
            logger.warning("broker away and %d results already held (mqtt.result_buffer): the result of QoS 0 "
                           "frame %s is lost", self.cfg.mqtt.result_buffer, frame.frame_id)
        return False

    # ---- timers ---------------------------------------------------------------
    def _upkeep_memory(self, now: float) -> None:
        """Pool upkeep; once idle after a burst, hand the C heap's free pages back too.

        Big payloads pass through paho's buffers on the C heap; glibc keeps the freed
        pages (FIELD-NOTES: 82 MiB kept, 12 MiB after malloc_trim), so RSS would not drop.
        """
        shrinks = self.pool.stats()["shrinks"]
        self.pool.maintain()
        busy = self.queue_depth() or any(s.handle is not None and s.handle.inflight for s in self.slots)
        if busy:
            self._idle_since = now
        elif now - self._idle_since > 2.0 and (shrinks != self._trimmed_at_shrinks or now - self._last_trim > 300):
            self._trimmed_at_shrinks = self.pool.stats()["shrinks"]
            self._last_trim = now
            heap.trim()

    def _update_state(self) -> None:
        if self.stopping:
            new = "stopping"
        elif not self.link.connected or not self.slots:
            new = "starting"  # INTERFACE: starting = model loading or broker not (yet) connected
        elif all(s.handle is not None and s.handle.state == "ready" for s in self.slots):
            new = "online"
        else:
            new = "degraded"
        if new != self.state:
            logger.info("state %s -> %s", self.state, new)
            self.state = new
            self.link.set_status(json.dumps({"state": new, "version": __version__, "model": self.model_info.get("name"),
                                             "ts": round(time.time(), 3)}).encode())
            self.notifier.status(f"{new}: {self.model_info.get('name')} on {self.accel_info.get('chosen')}")

    def snapshot(self) -> dict[str, Any]:
        import psutil

        with self.cond:
            workers = [{"index": s.index, "pid": s.handle.pid if s.handle else None,
                        "state": s.handle.state if s.handle else "absent", "restarts": s.restarts,
                        "sandboxed": bool(s.handle and s.handle.info.get("sandboxed")),
                        "sandbox_profile": s.handle.info.get("sandbox_profile") if s.handle else None,
                        "inflight": len(s.handle.inflight) if s.handle else 0, "last_exit": s.last_exit,
                        "served": s.handle.served if s.handle else 0,
                        "batch_max": int(s.handle.info.get("batch", 1)) if s.handle else 1,
                        "batched": s.handle.batched if s.handle else 0,
                        "accelerator": s.handle.info.get("accelerator", {}).get("chosen") if s.handle else None,
                        "model": s.handle.model_name if s.handle else None} for s in self.slots]
            depth = self.queue_depth()
        mem = {"rss_bytes": psutil.Process().memory_info().rss, "workers": {}}
        for w in workers:
            try:
                w["rss_bytes"] = psutil.Process(w["pid"]).memory_info().rss if w["pid"] else 0
            except psutil.Error:
                w["rss_bytes"] = 0
            mem["workers"][str(w["pid"])] = w["rss_bytes"]
        m = self.metrics.snapshot()
        return {"state": self.state, "version": __version__, "device_id": self.cfg.device_id,
                "uptime_s": round(time.monotonic() - self.started, 1),
                "model": {k: self.model_info.get(k) for k in ("name", "path", "task", "input", "outputs", "backend")},
                "accelerator": self.accel_info, "frames": m["frames"], "errors_by_code": m["errors_by_code"],
                "latency_ms": m["latency_ms"], "stages_ms": m["stages_ms"], "queue_depth": depth,
                "pool": self.pool.stats(), "workers": workers, "memory": mem,
                "mqtt": {"connected": self.link.connected, "reconnects": self.link.reconnects,
                         "result_overflows": self.link.overflows, "broker": f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}"}}

    def _periodic(self, now: float) -> None:
        interval = self.cfg.status.interval
        if interval and now - self._last_stats >= interval:
            self._last_stats = now
            st = self.snapshot()
            self.link.publish_stats(json.dumps(st).encode())
            self.ha.on_stats(st)  # HA hook 4/6: the daemon's sensors
            if self.cfg.status.prometheus_file:
                try:
                    write_prometheus(self.cfg.status.prometheus_file, st)
                except OSError as exc:
                    logger.warning("status.prometheus_file: %s", exc)
        wd = self.notifier.watchdog_interval()
        if wd and now - self._last_watchdog >= wd and self._healthy(now):
            self._last_watchdog = now
            self.notifier.watchdog()

    # ---- signals, reload, main loop ------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _on_connection(self, up: bool) -> None:
        if up:
            self.ha.on_connect()  # HA hook 5/6: announce again after every (re)connect
        self._wake()

    def _signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self.stopping = True
        self._wake()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._signal)
        if cfg_needs_prometheus(self.cfg):
            key = "prometheus_file" if self.cfg.status.prometheus_file else "prometheus_port"
            raise ConfigError(f"{self.cfg.source} status.{key}: needs the prometheus-client package "
                              "(pip install 'edged[prometheus]')")
        try:
            self.status_server.start()
        except (OSError, EdgedError) as exc:
            raise ConfigError(f"{self.cfg.source} status.socket: cannot serve {self.cfg.status.socket}: {exc}") from None
        if self.cfg.status.prometheus_port:  # Prometheus hook 1/2: the optional HTTP /metrics listener
            from edged.prometheus import HttpExporter

            try:
                self.exporter = HttpExporter(self.cfg.source, self.cfg.status.prometheus_bind,
                                             self.cfg.status.prometheus_port, self.snapshot)
            except ConfigError:
                self.status_server.close()
                raise
        self.loop.start()
        try:
            self.start_workers()
        except (ModelError, WorkerError):
            self.status_server.close()
            self.loop.stop()
            raise
        self.link.start()
        dispatcher = threading.Thread(target=self._dispatch_loop, name="dispatcher", daemon=True)
        dispatcher.start()
        ready_sent = False
        try:
            while not self.stopping:
                now = time.monotonic()
                if self._reload_requested:
                    self._reload_requested = False
                    self.reload()
                self._check_workers(now)
                self._restart_due()
                self._upkeep_memory(now)
                self._update_state()
                if not ready_sent and (self.state == "online" or now - self.started > 10):
                    ready_sent = True
                    self.notifier.ready(f"{self.state}: {self.model_info.get('name')}")
                self._periodic(now)
                self.ha.poll(now)  # HA hook 6/6: birth republish, rate-limited labels
                if self.fatal:
                    logger.critical("%s", self.fatal)
                    return EX_SOFTWARE
                self._sleep(0.25)
            return self._drain(dispatcher)
        finally:
            self._shutdown()

    def _sleep(self, seconds: float) -> None:
        import select

        r, _, _ = select.select([self._wake_r], [], [], seconds)
        if r:
            try:
                os.read(self._wake_r, 4096)
            except OSError:
                pass

    def _drain(self, dispatcher: threading.Thread) -> int:
        self.notifier.stopping()
        self._update_state()
        end = time.monotonic() + self.cfg.queue.drain_timeout_s
        logger.info("stopping: draining %d queued and %d in-flight frame(s)", self.queue_depth(),
                    sum(len(s.handle.inflight) for s in self.slots if s.handle))
        with self.cond:
            self.cond.notify_all()
            while time.monotonic() < end and (self.queue_depth() or any(s.handle and s.handle.inflight for s in self.slots)):
                self.cond.wait(0.1)
            left = self.queue_depth() + sum(len(s.handle.inflight) for s in self.slots if s.handle)
        if left:
            logger.warning("drain timeout: %d frame(s) not answered; the broker redelivers them", left)
        return EX_OK

    def _shutdown(self) -> None:
        self.stopping = True
        with self.cond:
            self.cond.notify_all()
            handles = [s.handle for s in self.slots if s.handle is not None]
        for h in handles:
            h.stop(grace=2.0)
        try:
            self.link.stop(json.dumps({"state": "stopped", "ts": round(time.time(), 3)}).encode())
        except Exception:  # teardown goes on whatever the broker does
            logger.debug("mqtt stop failed", exc_info=True)
        self.loop.stop()
        self.status_server.close()
        if self.exporter is not None:  # Prometheus hook 2/2
            self.exporter.close()
        self.pool.close()
