"""Worker supervision: starting, replacing and retiring worker processes.

A mixin of the Supervisor (edged.daemon), which owns the state it works on: the
slots, the lock and the config. A worker that dies, hangs past the frame
deadline or misses heartbeats is killed, its frames answered, and replaced with
capped exponential backoff; too many restarts in the window set `fatal`, and
the daemon exits 70. SIGHUP starts new workers on the new config before the old
ones retire.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edged import config
from edged.errors import EdgedError
from edged.ioloop import IoLoop
from edged.workers import InProcessWorkerHandle, WorkerHandle

if TYPE_CHECKING:
    from edged.daemon import Frame
    from edged.homeassistant import HomeAssistant
    from edged.notify import Notifier

logger = logging.getLogger(__name__)

@dataclass
class Slot:
    """A worker position: the live handle, and its restart history."""

    index: int
    handle: WorkerHandle | None = None
    restarts: int = 0
    restart_times: collections.deque[float] = dataclasses.field(default_factory=collections.deque)
    next_start: float | None = None
    last_exit: str = ""


class Supervision:
    """Worker lifecycle for the Supervisor; see the module docstring."""

    cfg: config.Config
    cond: threading.Condition
    slots: list[Slot]
    generation: int
    stopping: bool
    fatal: str | None
    notifier: Notifier
    model_info: dict[str, Any]
    accel_info: dict[str, Any]
    loop: IoLoop
    ha: HomeAssistant

    def _wake(self) -> None:
        raise NotImplementedError

    def _fail(self, frame: Frame, code: str, message: str, h: WorkerHandle | None = None) -> None:
        raise NotImplementedError

    def _on_worker_message(self, h: WorkerHandle, msg: dict[str, Any]) -> None:
        raise NotImplementedError

    def _init_msg(self, cfg: config.Config) -> dict[str, Any]:
        src = Path(cfg.source)
        return {"t": "init", "config_text": src.read_text(), "config_name": str(src), "config_base": str(src.resolve().parent),
                "sandbox": cfg.sandbox.enabled, "sandbox_mode": cfg.sandbox.mode,
                "memory_limit": cfg.sandbox.memory_limit_mb << 20,
                "batch_max": cfg.model.batch_max, "batch_wait_ms": cfg.model.batch_wait_ms,
                "max_fds": 32 + int(cfg.pool.max_mb / max(cfg.pool.segment_mb, 0.0625)) + 1,
                "log_level": logging.getLevelName(cfg.logging.level)}

    def _spawn(self, index: int, cfg: config.Config) -> WorkerHandle:
        init = dict(self._init_msg(cfg), coral_device=cfg.coral_device(index))
        kind = InProcessWorkerHandle if cfg.sandbox.in_process else WorkerHandle
        h = kind(index, init, self._on_worker_message, self._on_worker_exit, self.generation, loop=self.loop)
        h.start()
        # a batching worker gets two batches' worth, so the next batch is waiting while one runs
        h.window = max(cfg.queue.inflight_per_worker, 2 * int(h.info.get("batch", 1)))
        logger.info("worker %d ready: pid %s, model %s on %s, sandboxed %s", index, h.pid, h.model_name,
                    h.info.get("accelerator", {}).get("chosen"), h.info.get("sandboxed"))
        return h

    def _adopt(self, h: WorkerHandle) -> None:
        self.model_info = dict(h.info.get("model", {}), task=h.info.get("task"), name=h.model_name)
        self.accel_info = h.info.get("accelerator", {})

    def start_workers(self) -> None:
        """Start every worker; a model or config error here is fatal (exit 78)."""
        if self.cfg.sandbox.in_process:
            logger.warning("sandbox.in_process: inference runs on threads of this process, unfiltered and without "
                           "crash isolation (for debugging only)")
        handles = [self._spawn(i, self.cfg) for i in range(self.cfg.worker_count)]
        with self.cond:
            self.slots = [Slot(i, h) for i, h in enumerate(handles)]
            self._adopt(handles[0])
            self.cond.notify_all()

    def _on_worker_exit(self, h: WorkerHandle) -> None:
        with self.cond:
            frames = list(h.inflight.values())
            h.inflight.clear()
            expected = h.state in ("stopping", "stopped") or h.retiring
            h.state = "dead" if not expected else "stopped"
            slot = next((s for s in self.slots if s.handle is h), None)
            if slot is not None and not self.stopping:
                slot.last_exit = h.exit_description()
                now = time.monotonic()
                while slot.restart_times and now - slot.restart_times[0] > self.cfg.sandbox.restart_window_s:
                    slot.restart_times.popleft()
                backoff = min(self.cfg.sandbox.backoff_max_s, 0.25 * (2 ** len(slot.restart_times)))
                slot.next_start = now + (0 if not slot.restart_times else backoff)
                slot.restart_times.append(now)
                if len(slot.restart_times) > self.cfg.sandbox.max_restarts:
                    self.fatal = (f"worker {slot.index} died {len(slot.restart_times)} times in "
                                  f"{self.cfg.sandbox.restart_window_s:.0f} s (last: {slot.last_exit}); giving up")
            self.cond.notify_all()
        if slot is not None and not expected:
            logger.error("worker %d (pid %s) %s with %d frame(s) in flight", h.index, h.pid,
                         h.exit_description(), len(frames))
        for f in frames:
            self._fail(f, f.error_code, f"worker {h.index} {h.exit_description()} while serving this frame"
                       if f.error_code == "worker_crashed" else "inference took longer than sandbox.frame_timeout_s")
        self._wake()

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            h = slot.handle
            if h is not None and h.state != "dead":
                continue
            if slot.next_start is None or slot.next_start > now:
                continue
            slot.next_start = None
            threading.Thread(target=self._restart, args=(slot,), name=f"restart-{slot.index}", daemon=True).start()

    def _restart(self, slot: Slot) -> None:
        try:
            h = self._spawn(slot.index, self.cfg)
        except EdgedError as exc:
            logger.error("worker %d restart failed: %s", slot.index, exc)
            with self.cond:
                slot.restart_times.append(time.monotonic())
                slot.next_start = time.monotonic() + self.cfg.sandbox.backoff_max_s
                if len(slot.restart_times) > self.cfg.sandbox.max_restarts:
                    self.fatal = f"worker {slot.index} cannot be restarted: {exc}"
            self._wake()
            return
        with self.cond:
            if self.stopping or slot.handle is not None and slot.handle.state not in ("dead", "stopped"):
                stale = h
            else:
                stale = None
                slot.handle = h
                slot.restarts += 1
                self.cond.notify_all()
        if stale is not None:
            stale.stop()
        self._wake()

    def _check_workers(self, now: float) -> None:
        sb = self.cfg.sandbox
        for slot in self.slots:
            h = slot.handle
            if h is None or h.state != "ready":
                continue
            with self.cond:
                oldest = min(h.inflight.values(), key=lambda f: f.t_dispatch, default=None)
                if oldest is not None and now - oldest.t_dispatch > sb.frame_timeout_s:
                    oldest.error_code = "timeout"
            if oldest is not None and oldest.error_code == "timeout":
                logger.error("worker %d (pid %s): frame %s exceeded %.1f s; killing the worker", h.index, h.pid,
                             oldest.frame_id, sb.frame_timeout_s)
                h.kill()
                continue
            if now - h.last_pong > max(3 * sb.heartbeat_s, sb.frame_timeout_s + sb.heartbeat_s):
                logger.error("worker %d (pid %s) missed its heartbeats; killing it", h.index, h.pid)
                h.kill()
                continue
            h.ping()

    def _healthy(self, now: float) -> bool:
        """True while at least one worker answered recently (what the watchdog vouches for)."""
        limit = max(2 * self.cfg.sandbox.heartbeat_s, 1.0) + 1.0
        return any(s.handle is not None and s.handle.state == "ready" and now - s.handle.last_pong < limit
                   for s in self.slots)

    def reload(self) -> None:
        """Load the new config and model in fresh workers, then retire the old ones: no frame lost."""
        self.notifier.reloading()
        try:
            new_cfg = config.load(self.cfg.source)
            if new_cfg.mqtt != self.cfg.mqtt or new_cfg.status != self.cfg.status:
                logger.warning("reload: mqtt and status changes take effect at the next restart")
                new_cfg = dataclasses.replace(new_cfg, mqtt=self.cfg.mqtt, status=self.cfg.status)
            self.generation += 1
            fresh = [self._spawn(i, new_cfg) for i in range(new_cfg.worker_count)]
        except EdgedError as exc:
            logger.error("reload failed, still serving the previous model: %s", exc)
            self.notifier.ready(f"reload failed: {exc}")
            return
        with self.cond:
            old = [s.handle for s in self.slots if s.handle is not None]
            for h in old:
                h.retiring = True
            self.cfg = new_cfg
            self.slots = [Slot(i, h) for i, h in enumerate(fresh)]
            self._adopt(fresh[0])
            self.cond.notify_all()
        self.ha.reconfigure(new_cfg)  # HA hook (reload): new entities announced, dropped ones emptied
        logger.info("reload: now serving %s; retiring %d old worker(s)", fresh[0].model_name, len(old))
        threading.Thread(target=self._retire, args=(old,), name="retire", daemon=True).start()
        self.notifier.ready(f"reloaded: {fresh[0].model_name}")

    def _retire(self, handles: list[WorkerHandle]) -> None:
        end = time.monotonic() + self.cfg.sandbox.frame_timeout_s + 5
        with self.cond:
            while any(h.inflight for h in handles) and time.monotonic() < end:
                self.cond.wait(0.1)
        for h in handles:
            h.stop()
