"""Worker supervision: starting, watching, replacing, reloading and retiring worker processes.

`Workers` owns the worker slots. A worker that dies, hangs past the frame
deadline or misses heartbeats is killed and replaced with capped exponential
backoff; the frames it held go back to whoever owns frames (the daemon's
`on_orphans`), which runs each once more. Too many restarts in the window set
`fatal`, and the daemon exits 70. A reload or a model swap (edged.switching)
starts new workers on the new config before the old ones retire. Workers
always start from the config held in memory (the text last loaded,
edged.workerinit), never from the file as it is now.

Accelerator health (edged.health keeps the books): every worker starts on
the best kind not set aside and answers the known-answer self-test
(edged.selftest) before it takes frames. A crash, a hang, a load failure or a
wrong self-test counts against the worker's accelerator; past the limit the
accelerator is set aside, workers still on it are replaced on the next kind,
and a probe thread later tries it in a worker of its own; when that passes,
fresh workers on it replace the serving ones as a reload does.

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
from typing import Any

from edged import config, protocol, selftest
from edged.errors import EdgedError, ModelError
from edged.health import Health
from edged.ioloop import IoLoop
from edged.probes import Prober
from edged.switching import Switcher
from edged.verdicts import Judge
from edged.workerinit import ModelSpec, init_message, read_config_text, with_model
from edged.workers import InProcessWorkerHandle, WorkerHandle

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


OnMessage = Callable[[WorkerHandle, "protocol.Result | protocol.Pong"], None]
OnOrphans = Callable[[WorkerHandle, list[Any]], None]
OnEvent = Callable[[dict[str, Any]], None]

SET_ASIDE = "set_aside"  # kill cause: its accelerator was set aside under it (its frames are not to blame)
SELFTEST = "selftest"  # kill cause: its in-service self-test answered wrong
UNBLAMED = (SET_ASIDE, SELFTEST)  # kills whose frames run again without counting as their death


class Workers:
    """The worker slots and their lifecycle; see the module docstring. `cond` is the supervisor's one lock."""

    def __init__(self, cfg: config.Config, cond: threading.Condition, loop: IoLoop, *, on_message: OnMessage,
                 on_orphans: OnOrphans, wake: Callable[[], None], on_event: OnEvent | None = None) -> None:
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
        self.on_event: OnEvent = on_event or (lambda _e: None)
        self.health = Health(cfg.accelerator.prefer, cfg.accelerator.health)
        self.expected: selftest.Expected | None = None
        self.model_sha = ""
        self.prober = Prober(self)
        self.judge = Judge(self)  # the self-test's expected outputs and verdicts (edged.verdicts)
        self.on_reload: Callable[[config.Config], None] | None = None  # after a reload or swap, outside the lock
        # model updates (edged.updates): the model serving instead of the config's; self.cfg is the config with
        # it filled in (with_model), so the self-test, probes and status all see the model that serves
        self.model: ModelSpec | None = None
        self.config_model = cfg.model  # model as the config file says (the fallback)
        self.switch = Switcher(self)  # reload and model swap (edged.switching)

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
    def _spawn(self, index: int, cfg: config.Config, text: str, kinds: list[str] | None = None,
               model: ModelSpec | str | None = "serving") -> WorkerHandle:
        spec = self.model if model == "serving" else model
        init = init_message(cfg, text, cfg.coral_device(index), accelerators=kinds,
                            model=spec if isinstance(spec, ModelSpec) else None)
        kind = InProcessWorkerHandle if cfg.sandbox.in_process else WorkerHandle
        h = kind(index, init, self._deliver, self._on_exit, self.generation, loop=self.loop)
        h.invoke_timeout_s = cfg.sandbox.frame_timeout_s
        h.on_selftest = self._on_selftest_report
        h.start(timeout=cfg.sandbox.start_timeout_s)
        h.last_selftest = time.monotonic()
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

    def set_model(self, model: ModelSpec | None) -> None:
        """Before start_all: serve `model` (None: the config's)."""
        self.model = model
        self.cfg = with_model(dataclasses.replace(self.cfg, model=self.config_model), model)

    def _seat(self, handles: list[WorkerHandle]) -> None:
        """Under the lock: `handles` take the slots, in order; status shows the first one's model."""
        self.slots = [Slot(i, h) for i, h in enumerate(handles)]
        self._adopt(handles[0])

    def _adopt(self, h: WorkerHandle) -> None:
        self.model_info = dict(h.info.get("model", {}), task=h.info.get("task"), name=h.model_name)
        self.accel_info = h.info.get("accelerator", {})

    def _start_slot(self, index: int, cfg: config.Config, text: str) -> WorkerHandle:
        """At start: the best kind that loads and passes; a kind that fails its self-test is set aside at once."""
        while True:
            kinds = self.health.candidates()
            h = self._spawn(index, cfg, text, kinds)  # no kind loads: ModelError, exit 78
            chosen = h.accelerator
            for skip in h.info.get("accelerator", {}).get("skipped", []):
                if isinstance(skip, dict) and skip.get("kind") != chosen:
                    self.health.skip(str(skip.get("kind")), str(skip.get("reason")))
            if not self.judge.usable(self.expected, h, cfg):
                self.expected = self.judge.reference(h, cfg, text, self.model_sha)
            assert self.expected is not None  # usable() or reference() gave one
            v = self.judge.verdict(h, cfg, self.expected)
            if v.passed:
                return h
            h.stop()
            if chosen == "cpu" or chosen not in kinds or kinds == [chosen]:
                where = "the CPU" if chosen == "cpu" else f"{chosen}, the last kind of accelerator.prefer left,"
                raise ModelError(f"model {cfg.model.path}: the self-test on {where} does not give the expected "
                                 f"outputs ({v.reason}; expected from {self.expected.source})")
            with self.cond:
                a = self.health.set_aside(chosen, f"self-test failed at start: {v.reason}")
            self._announce_set_aside(a.kind, a.reason)

    def start_all(self) -> None:
        """Start every worker; a model or config error here is fatal (exit 78)."""
        if self.cfg.sandbox.in_process:
            logger.warning("sandbox.in_process: inference runs on threads of this process, unfiltered and without "
                           "crash isolation (for debugging only)")
        self.model_sha, self.expected = self.judge.expected_for(self.cfg)
        handles = [self._start_slot(i, self.cfg, self.config_text) for i in range(self.cfg.worker_count)]
        with self.cond:
            self._seat(handles)
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
            self.health.served(h.accelerator, h.served, h.inference_ms)
            slot = next((s for s in self.slots if s.handle is h), None)
            moved = h.kill_cause is not None and h.kill_cause[0] in UNBLAMED
            if slot is not None and not self.stopping and moved:
                slot.last_exit = (f"moved off {h.accelerator} (set aside)" if h.kill_cause[0] == SET_ASIDE  # type: ignore[index]
                                  else f"stopped: its self-test on {h.accelerator} answered wrong")
                slot.next_start = time.monotonic()
            elif slot is not None and not self.stopping:
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
        if slot is not None and not expected and not moved:
            logger.error("worker %d (pid %s) %s with %d frame(s) in flight", h.index, h.pid,
                         h.exit_description(), len(frames))
            hang = h.kill_cause is not None and h.kill_cause[0] in ("timeout", "heartbeat")
            self._failed(h.accelerator, "hang" if hang else "crash", h.exit_description())
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
        self.prober.due(now)

    def _restart(self, slot: Slot) -> None:
        kind = self.health.current()
        cfg, text, expected = self.cfg, self.config_text, self.expected
        why = ""
        try:
            h = self._spawn(slot.index, cfg, text, [kind] if kind else None)
            assert expected is not None  # usable() or reference() gave one
            v = self.judge.verdict(h, cfg, expected) if expected is not None else None
            if v is not None and not v.passed:
                h.stop()
                why = f"self-test failed: {v.reason}"
                raise ModelError(why)
        except Exception as exc:  # top of the restart thread: it must never die with the slot left dead
            if not isinstance(exc, EdgedError):
                logger.exception("worker %d restart failed", slot.index)
            else:
                logger.error("worker %d restart on %s failed: %s", slot.index, kind, exc)
            moved = self._failed(kind, "selftest" if why else getattr(exc, "cause", "load"), str(exc))
            with self.cond:
                now = time.monotonic()
                while slot.restart_times and now - slot.restart_times[0] > cfg.sandbox.restart_window_s:
                    slot.restart_times.popleft()
                slot.restart_times.append(now)
                backoff = min(cfg.sandbox.backoff_max_s, 0.25 * (2 ** len(slot.restart_times)))
                slot.next_start = now + (0 if moved else backoff)  # set aside: on the next kind at once
                if len(slot.restart_times) > cfg.sandbox.max_restarts:
                    self.fatal = f"worker {slot.index} cannot be restarted: {exc}"
            self.wake()
            return
        with self.cond:
            if self.stopping or slot not in self.slots or \
                    (slot.handle is not None and slot.handle.state not in ("dead", "stopped")):
                stale: WorkerHandle | None = h
            elif h.accelerator in self.health.aside:  # set aside while it started: on the next kind instead
                stale = h
                slot.next_start = time.monotonic()
            else:
                stale = None
                slot.handle = h
                slot.restarts += 1
                if slot is self.slots[0]:
                    self._adopt(h)  # what status shows: the accelerator may be another one now
                self.cond.notify_all()
        if stale is not None:
            stale.stop()
        self.wake()

    # ---- accelerator health -------------------------------------------------------------------------------------
    def _failed(self, kind: str | None, cause: str, detail: str) -> bool:
        """One failure of `kind`; True when it set the kind aside (workers still on it are moved off)."""
        with self.cond:
            a = self.health.failure(kind, cause, detail)
            victims = [s.handle for s in self.slots if a is not None and s.handle is not None
                       and s.handle.state == "ready" and s.handle.accelerator == kind]
        if a is None:
            return False
        self._announce_set_aside(a.kind, a.reason)
        for h in victims:  # a wrong answer or a dying device: they take no more frames; theirs run elsewhere
            h.kill_for(SET_ASIDE)
        return True

    def _announce_set_aside(self, kind: str, reason: str) -> None:
        nxt = self.health.current()
        logger.warning("accelerator %s set aside (%s); serving on %s; first probe in %.0f s", kind, reason, nxt,
                       self.cfg.accelerator.health.probe_s)
        self.on_event({"event": "set_aside", "ts": round(time.time(), 3), "accelerator": kind, "reason": reason,
                       "serving_on": nxt, "next_probe_s": self.cfg.accelerator.health.probe_s})
        self.wake()

    def degraded_reason(self) -> str | None:
        return self.health.degraded_reason()

    def accelerator_report(self) -> dict[str, Any]:
        """accelerator.set_aside, .temperature_c and per-kind counters, for status (under the lock)."""
        live: dict[str, tuple[int, float]] = {}
        for h in self.handles():
            n, ms = live.get(h.accelerator or "", (0, 0.0))
            live[h.accelerator or ""] = (n + h.served, ms + h.inference_ms)
        return self.health.report(live)

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
            interval = self.cfg.model.selftest.interval_s
            if interval and h.selftest_sent is None and now - h.last_selftest >= interval and self.expected:
                h.selftest_sent = h.last_selftest = now
                h.send(protocol.SelfTest())

    def _on_selftest_report(self, h: WorkerHandle, report: dict[str, Any]) -> None:
        """On the I/O thread: an in-service self-test's answers. Wrong: the worker's results stop here and now."""
        expected = self.expected
        if expected is None or h.retiring:
            return
        v = self.judge.verdict(h, self.cfg, expected, report)
        if not v.passed:
            h.kill_for(SELFTEST)  # its later replies are dropped; its frames run again elsewhere
            self._failed(h.accelerator, "selftest", v.reason)

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

    # ---- teardown ---------------------------------------------------------------------------------------------
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
