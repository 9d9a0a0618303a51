"""Worker supervision: starting, watching, replacing, reloading and retiring worker processes.

`Workers` owns the worker slots. A worker that dies, hangs past the frame
deadline or misses heartbeats is killed and replaced with capped exponential
backoff; the frames it held go back to whoever owns frames (the daemon's
`on_orphans`), which runs each once more. Too many restarts in the window set
`fatal`, and the daemon exits 70. A reload starts new workers on the new
config before the old ones retire. Workers always start from the config
held in memory (the text last loaded), never from the file as it is now.

It does not import the daemon or admission: frames are opaque to it (it
reads their `t_dispatch` and `seq`), and every event goes out through the
callbacks it was given.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edged import config, protocol
from edged.errors import ConfigError, EdgedError
from edged.ioloop import IoLoop
from edged.workers import InProcessWorkerHandle, WorkerHandle

logger = logging.getLogger(__name__)


def read_config_text(cfg: config.Config) -> str:
    try:
        return Path(cfg.source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{cfg.source}: cannot read config: {exc}") from None


def init_message(cfg: config.Config, config_text: str, coral_device: str | None = None, *,
                 sandbox: bool | None = None, model_path: str | None = None,
                 model: ModelSpec | None = None) -> protocol.Init:
    """What a worker is told at start: the one builder, for the daemon and the bench alike."""
    src = Path(cfg.source)
    return protocol.Init(config_text=config_text, config_name=str(src), config_base=str(src.resolve().parent),
                         sandbox=cfg.sandbox.enabled if sandbox is None else sandbox, sandbox_mode=cfg.sandbox.mode,
                         memory_limit=cfg.sandbox.memory_limit_mb << 20, batch_max=cfg.model.batch_max,
                         batch_wait_ms=cfg.model.batch_wait_ms,
                         max_fds=32 + int(cfg.pool.max_mb / max(cfg.pool.segment_mb, 0.0625)) + 1,
                         log_level=logging.getLevelName(cfg.logging.level), coral_device=coral_device,
                         model_path=model.path if model else model_path, model_task=model.task if model else None,
                         model_labels=model.labels if model else None)


@dataclass(frozen=True)
class ModelSpec:
    """A model other than the config's (from the update store): its file, labels and task."""

    path: str
    labels: str | None
    task: str


@dataclass
class Slot:
    """A worker position: the live handle, and its restart history."""

    index: int
    handle: WorkerHandle | None = None
    restarts: int = 0
    restart_times: collections.deque[float] = dataclasses.field(default_factory=collections.deque)
    next_start: float | None = None
    last_exit: str = ""


OnMessage = Callable[[WorkerHandle, "protocol.Result | protocol.Pong"], None]
OnOrphans = Callable[[WorkerHandle, list[Any]], None]


class Workers:
    """The worker slots and their lifecycle; see the module docstring. `cond` is the supervisor's one lock."""

    def __init__(self, cfg: config.Config, cond: threading.Condition, loop: IoLoop, *, on_message: OnMessage,
                 on_orphans: OnOrphans, wake: Callable[[], None]) -> None:
        self.cfg = cfg
        self.config_text = read_config_text(cfg)
        self.cond = cond
        self.loop = loop
        self.on_message = on_message
        self.on_orphans = on_orphans
        self.wake = wake
        self.slots: list[Slot] = []
        self.generation = 0
        self.stopping = False
        self.fatal: str | None = None
        self.model_info: dict[str, Any] = {}
        self.accel_info: dict[str, Any] = {}
        self.model: ModelSpec | None = None  # None: the config's model; else what edged.updates applied
        self._switching = threading.Lock()  # one reload or model swap at a time
        self.on_reload: Callable[[config.Config], None] | None = None  # after a reload or swap, outside the lock

    # ---- queries (under the lock) -------------------------------------------------------------------------------
    def handles(self) -> list[WorkerHandle]:
        return [s.handle for s in self.slots if s.handle is not None]

    def ready(self) -> list[WorkerHandle]:
        """Workers that can take one more frame now."""
        return [s.handle for s in self.slots if s.handle is not None and s.handle.state == "ready"
                and len(s.handle.inflight) < s.handle.window]

    def inflight(self) -> int:
        return sum(len(h.inflight) for h in self.handles())

    def all_ready(self) -> bool:
        return bool(self.slots) and all(s.handle is not None and s.handle.state == "ready" for s in self.slots)

    # ---- starting -----------------------------------------------------------------------------------------------
    def _spawn(self, index: int, cfg: config.Config, text: str) -> WorkerHandle:
        init = init_message(cfg, text, cfg.coral_device(index), model=self.model)
        kind = InProcessWorkerHandle if cfg.sandbox.in_process else WorkerHandle
        h = kind(index, init, self._deliver, self._on_exit, self.generation, loop=self.loop)
        h.start(timeout=cfg.sandbox.start_timeout_s)
        # a batching worker gets two batches' worth, so the next batch is waiting while one runs
        h.window = max(cfg.queue.inflight_per_worker, 2 * int(h.info.get("batch", 1)))
        logger.info("worker %d ready: pid %s, model %s on %s, sandboxed %s", index, h.pid, h.model_name,
                    h.accelerator, h.info.get("sandboxed"))
        return h

    def _deliver(self, h: WorkerHandle, msg: protocol.Result | protocol.Pong) -> None:
        """A worker's reply: to its probe sink while it is a candidate (edged.updates), else to the daemon."""
        sink = h.probe_sink
        if sink is not None:
            sink(msg)
        else:
            self.on_message(h, msg)

    def candidate(self, model: ModelSpec | None) -> WorkerHandle:
        """A started worker on `model` in no slot (it takes no frames): its replies go to h.probe_sink.

        swap_model(model, [h]) makes it a serving worker; else the caller stops it.
        """
        saved, self.model = self.model, model
        try:
            return self._spawn(0, self.cfg, self.config_text)
        finally:
            self.model = saved

    def _adopt(self, h: WorkerHandle) -> None:
        self.model_info = dict(h.info.get("model", {}), task=h.info.get("task"), name=h.model_name)
        self.accel_info = h.info.get("accelerator", {})

    def start_all(self) -> None:
        """Start every worker; a model or config error here is fatal (exit 78)."""
        if self.cfg.sandbox.in_process:
            logger.warning("sandbox.in_process: inference runs on threads of this process, unfiltered and without "
                           "crash isolation (for debugging only)")
        handles = [self._spawn(i, self.cfg, self.config_text) for i in range(self.cfg.worker_count)]
        with self.cond:
            self.slots = [Slot(i, h) for i, h in enumerate(handles)]
            self._adopt(handles[0])
            self.cond.notify_all()

    # ---- a worker's end -----------------------------------------------------------------------------------------
    def _on_exit(self, h: WorkerHandle) -> None:
        if h.probe_sink is not None:  # a candidate died during its self-test
            h.probe_sink(None)
        slot = None
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
        if frames:
            self.on_orphans(h, frames)
        self.wake()

    def restart_due(self) -> None:
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
            h = self._spawn(slot.index, self.cfg, self.config_text)
        except Exception as exc:  # top of the restart thread: it must never die with the slot left dead
            if not isinstance(exc, EdgedError):
                logger.exception("worker %d restart failed", slot.index)
            else:
                logger.error("worker %d restart failed: %s", slot.index, exc)
            with self.cond:
                slot.restart_times.append(time.monotonic())
                slot.next_start = time.monotonic() + self.cfg.sandbox.backoff_max_s
                if len(slot.restart_times) > self.cfg.sandbox.max_restarts:
                    self.fatal = f"worker {slot.index} cannot be restarted: {exc}"
            self.wake()
            return
        with self.cond:
            if self.stopping or slot not in self.slots or \
                    slot.handle is not None and slot.handle.state not in ("dead", "stopped"):
                stale: WorkerHandle | None = h
            else:
                stale = None
                slot.handle = h
                slot.restarts += 1
                self.cond.notify_all()
        if stale is not None:
            stale.stop()
        self.wake()

    # ---- watching -----------------------------------------------------------------------------------------------
    def check(self, now: float) -> None:
        """Frame deadlines and heartbeats: a worker past either is killed (its frames run again elsewhere)."""
        sb = self.cfg.sandbox
        for slot in self.slots:
            h = slot.handle
            if h is None or h.state != "ready":
                continue
            with self.cond:
                oldest = min(h.inflight.values(), key=lambda f: f.t_dispatch, default=None)
            if oldest is not None and now - oldest.t_dispatch > sb.frame_timeout_s:
                logger.error("worker %d (pid %s): frame %s exceeded %.1f s; killing the worker", h.index, h.pid,
                             oldest.frame_id, sb.frame_timeout_s)
                h.kill_for("timeout", oldest.seq)
                continue
            if now - h.last_pong > max(3 * sb.heartbeat_s, sb.frame_timeout_s + sb.heartbeat_s):
                logger.error("worker %d (pid %s) missed its heartbeats; killing it", h.index, h.pid)
                h.kill_for("heartbeat")
                continue
            h.ping()

    def stalled(self, now: float) -> list[str]:
        """The slots that show no progress (what the watchdog must not vouch for).

        A ready worker progresses while it answers heartbeats; a slot being (re)started progresses
        until twice its start timeout has passed since its worker went away.
        """
        sb = self.cfg.sandbox
        limit = max(2 * sb.heartbeat_s, 1.0) + 1.0
        out = []
        for s in self.slots:
            h = s.handle
            if h is not None and h.state == "ready":
                if now - h.last_pong >= limit:
                    out.append(f"worker {s.index} (no heartbeat for {now - h.last_pong:.0f} s)")
            elif s.restart_times and now - s.restart_times[-1] > 2 * sb.start_timeout_s:
                out.append(f"worker {s.index} (down for {now - s.restart_times[-1]:.0f} s)")
        return out

    # ---- reload and teardown ------------------------------------------------------------------------------------
    def reload(self) -> config.Config | None:
        """Load the config file anew in fresh workers, then retire the old ones: no frame lost.

        Returns the new config, or None when the reload failed and the old workers keep serving.
        """
        with self._switching:
            return self._reload()

    def _reload(self) -> config.Config | None:
        try:
            new_cfg = config.load(self.cfg.source)
            text = read_config_text(new_cfg)
            if new_cfg.mqtt != self.cfg.mqtt or new_cfg.status != self.cfg.status:
                logger.warning("reload: mqtt and status changes take effect at the next restart")
                new_cfg = dataclasses.replace(new_cfg, mqtt=self.cfg.mqtt, status=self.cfg.status)
            self.generation += 1
            fresh = [self._spawn(i, new_cfg, text) for i in range(new_cfg.worker_count)]
        except EdgedError as exc:
            logger.error("reload failed, still serving the previous model: %s", exc)
            return None
        self._switch(fresh, new_cfg, text)
        return new_cfg

    def swap_model(self, model: ModelSpec | None, started: list[WorkerHandle] | None = None) -> None:
        """Serve `model` (None: the config's) as a reload does: fresh workers first, then the old ones retire.

        `started`: candidates already on this model (see candidate()), used first. Raises ModelError/WorkerError
        when a fresh worker does not start; the old ones then keep serving (and the candidates are stopped).
        """
        with self._switching:
            self.generation += 1
            old_model, self.model = self.model, model
            fresh = [h for h in started or () if h.state == "ready"][: self.cfg.worker_count]
            try:
                for h in fresh:
                    h.probe_sink = None
                    h.last_pong = time.monotonic()
                while len(fresh) < self.cfg.worker_count:
                    fresh.append(self._spawn(len(fresh), self.cfg, self.config_text))
            except BaseException:
                self.model = old_model
                for h in fresh:
                    h.stop()
                raise
            for i, h in enumerate(fresh):
                h.index = h.logs.index = i
                h.generation = self.generation
            self._switch(fresh, self.cfg, self.config_text, "model swap")

    def _switch(self, fresh: list[WorkerHandle], new_cfg: config.Config, text: str, why: str = "reload") -> None:
        with self.cond:
            old = self.handles()
            for h in old:
                h.retiring = True
            self.cfg, self.config_text = new_cfg, text
            self.slots = [Slot(i, h) for i, h in enumerate(fresh)]
            self._adopt(fresh[0])
            self.cond.notify_all()
        logger.info("%s: now serving %s; retiring %d old worker(s)", why, fresh[0].model_name, len(old))
        if self.on_reload is not None:
            self.on_reload(new_cfg)
        threading.Thread(target=self._retire, args=(old,), name="retire", daemon=True).start()

    def _retire(self, handles: list[WorkerHandle]) -> None:
        end = time.monotonic() + self.cfg.sandbox.frame_timeout_s + 5
        with self.cond:
            while any(h.inflight for h in handles) and time.monotonic() < end:
                self.cond.wait(0.1)
        for h in handles:
            h.stop()

    def drop_segment(self, seg_id: int) -> None:
        for s in list(self.slots):
            if s.handle is not None:
                s.handle.drop_segment(seg_id)

    def stop_all(self, grace: float = 2.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            handles = self.handles()
        for h in handles:
            h.stop(grace=grace)
