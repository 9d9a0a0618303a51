"""The supervisor: composes the daemon's owners and runs its lifecycle, timers, signals and teardown.

Owners (README "Design"): the MQTT adapter (edged.mqtt, behind edged.door)
feeds admission and dispatch (edged.admission), which hand frames to the
worker slots (edged.supervision); replies come back here and become result
JSON (edged.results). This module wires them and keeps what is the daemon's:
state, the periodic timers, SIGHUP/SIGTERM and the order of teardown; the
status snapshot is built by edged.snapshot from the same owners.

Threads: one I/O thread (edged.ioloop) drives paho and every worker channel:
admit() copies a frame into a pool block and hands it to a free worker at
once, _on_worker_message() publishes its result, with no hand-off between
threads on that path. A dispatcher thread is the fallback for frames that
waited (a restart, a reload, a retry); the main thread runs timers (deadlines,
heartbeats, restarts, pool upkeep, stats, watchdog) and handles signals, which
only set flags and write to a wake pipe. One Condition guards queues,
in-flight maps and worker slots. paho is never called with that lock held.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from typing import Any

from edged import __version__, config, heap, protocol
from edged.admission import Admission, Frame
from edged.door import Door
from edged.errors import ConfigError, EdgedError, ModelError, ProtocolError, WorkerError
from edged.homeassistant import HomeAssistant
from edged.fleet import ShareLink
from edged.ioloop import IoLoop
from edged.metrics import Metrics
from edged.mqtt import MqttLink
from edged.notify import Notifier
from edged.pool import FramePool
from edged.results import Results
from edged.snapshot import Snapshot, needs_prometheus
from edged.status import StatusServer
from edged.supervision import UNBLAMED, Workers
from edged.updates import ModelUpdates
from edged.watchdog import Progress
from edged.workers import WorkerHandle

logger = logging.getLogger(__name__)

EX_OK, EX_SOFTWARE, EX_CONFIG = 0, 70, 78


class Supervisor:
    def __init__(self, cfg: config.Config, env: dict[str, str] | None = None) -> None:
        heap.pin_mmap_threshold()
        self.cfg = cfg
        self.env = dict(os.environ if env is None else env)
        self.notifier = Notifier.from_env(self.env)
        self.metrics = Metrics()
        self.cond = threading.Condition()
        self.state = "starting"
        self.state_reason: str | None = None  # why the state is degraded (an accelerator set aside)
        self.started = time.monotonic()
        self.stopping = False
        self._reload_requested = False
        self._reloading: threading.Thread | None = None
        self.progress = Progress()
        self.stalled: list[str] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        p = cfg.pool
        self.pool = FramePool(initial_bytes=int(p.initial_mb * (1 << 20)), max_bytes=int(p.max_mb * (1 << 20)),
                              segment_bytes=int(p.segment_mb * (1 << 20)), idle_release_s=p.idle_release_s,
                              frag_threshold=p.frag_threshold, on_segment_released=self._segment_released)
        self.loop = IoLoop()
        self.workers = Workers(cfg, self.cond, self.loop, on_message=self._on_worker_message,
                               on_orphans=self._on_orphans, wake=self._wake, on_event=self._on_event)
        self.link = MqttLink(cfg, self._admit, self._on_connection, loop=self.loop,
                             door=Door(cfg, cfg.homeassistant.discovery_prefix), on_room=self._on_room)
        self.ha = HomeAssistant(cfg, self.link.publish_message)  # discovery and entity states (edged.homeassistant)
        self.link.add_route(self.ha.subscriptions(), self.ha.on_message)
        self.workers.on_reload = self.ha.reconfigure
        self.exporter: Any = None  # edged.prometheus.HttpExporter with status.prometheus_port
        # the fleet's shared subscription: a connection of its own, created after the own link so that in each
        # round of the I/O loop an answer is written before its frame's acknowledgement (edged.fleet)
        self.share = ShareLink(cfg, self._admit, loop=self.loop, door=self.link.door) if cfg.mqtt.share else None
        self.results = Results(self.link, self.metrics, cfg.mqtt.result_buffer,
                               lambda: self.workers.model_info.get("name"), on_result=self._on_result)
        self.admission = Admission(cfg, self.pool, self.cond, self.results, self.metrics, self.workers.ready)
        self.updates = ModelUpdates(cfg, self.workers, self.link.publish_message)
        if self.updates.enabled:
            self.link.add_route([(self.updates.topic, 1)], self.updates.on_message)
        self.snap = Snapshot(self.cond, self.workers, self.admission, self.metrics, self.pool, self.link,
                             self.results, self.share, self.updates, self.started, on_stats=self.ha.on_stats)
        self.status_server = StatusServer(cfg.status.socket, self.snapshot,
                                          {"model-rollback": self.updates.request_rollback})
        self._last_stats = 0.0
        self._last_watchdog = 0.0
        self._idle_since = self._last_trim = time.monotonic()
        self._trimmed_at_shrinks = 0

    # ---- frames in, answers out --------------------------------------------------------------------------------
    def _admit(self, inc: Any) -> None:
        if self.stopping and inc.ack is None:
            return  # not acknowledged: the broker delivers it again to the next start
        # a fleet frame is served even while stopping: the group is left first (_drain), and its session
        # ends with its connection, so nobody would deliver it again
        self.admission.admit(inc)

    def _on_worker_message(self, h: WorkerHandle, msg: protocol.Result | protocol.Pong) -> None:
        """On the I/O thread. A result for a frame the worker does not hold ends the worker (ProtocolError)."""
        h.last_pong = time.monotonic()
        if isinstance(msg, protocol.Pong):
            return
        with self.cond:
            frame = h.inflight.pop(msg.seq, None)
            if self.stopping or h.retiring:  # a drain or a retirement waits for in-flight frames to end
                self.cond.notify_all()
        if frame is None:
            raise ProtocolError(f"worker {h.index} answered frame {msg.seq}, which it does not hold")
        h.served += 1
        h.inference_ms += msg.inference_ms
        if msg.batch > 1:
            h.batched += 1
        if frame.lease is not None:
            frame.lease.release()
        self.admission.dispatch_ready()  # keep the worker busy before we spend time publishing
        try:
            self.results.answer(frame, h, msg)
        except Exception:  # one frame's failure is that frame's answer, never the worker's end
            logger.exception("answering frame %s failed", frame.frame_id)
            self.results.fail(frame, "internal_error", f"edged failed answering frame {frame.frame_id}")

    def _on_orphans(self, h: WorkerHandle, frames: list[Frame]) -> None:
        """The frames a dead worker held: each runs once more; at its second death it is answered."""
        cause, cause_seq = h.kill_cause or ("crash", None)
        if cause in UNBLAMED:  # its accelerator was set aside, or answered its self-test wrong: not the frames' fault
            for f in sorted(frames, key=lambda f: f.seq, reverse=True):
                self.admission.requeue(f)
            self.metrics.count("retried", len(frames))
            return
        again = []
        for f in frames:
            f.deaths += 1
            if f.deaths < 2:
                again.append(f)
            elif cause == "timeout" and f.seq == cause_seq:
                self.results.fail(f, "timeout", "inference took longer than sandbox.frame_timeout_s, twice")
            else:
                self.results.fail(f, "worker_crashed", f"worker {h.index} {h.exit_description()} while serving "
                                  "this frame, for the second time")
        for f in reversed(sorted(again, key=lambda f: f.seq)):
            self.admission.requeue(f)
        if again:
            self.metrics.count("retried", len(again))

    def _on_event(self, event: dict[str, Any]) -> None:
        """An accelerator-health event (edged.supervision): P/events, QoS 1, not retained."""
        self.link.publish_event(json.dumps(event).encode())

    def _on_room(self) -> None:
        if self.results.waiting:
            self.results.flush()

    def _on_result(self, result: dict[str, Any]) -> None:
        self.ha.on_result(result)  # the latest label of listed streams

    def _segment_released(self, seg_id: int) -> None:
        self.workers.drop_segment(seg_id)

    def queue_depth(self) -> int:
        return self.admission.depth()

    # ---- timers -------------------------------------------------------------------------------------------------
    def _upkeep_memory(self, now: float) -> None:
        """Pool upkeep; once idle after a burst, hand the C heap's free pages back too.

        Big payloads pass through paho's buffers on the C heap; glibc keeps the freed
        pages (FIELD-NOTES: 82 MiB kept, 12 MiB after malloc_trim), so RSS would not drop.
        """
        shrinks = self.pool.stats()["shrinks"]
        self.pool.maintain()
        with self.cond:
            busy = self.queue_depth() or self.workers.inflight()
        if busy:
            self._idle_since = now
        elif now - self._idle_since > 2.0 and (shrinks != self._trimmed_at_shrinks or now - self._last_trim > 300):
            self._trimmed_at_shrinks = self.pool.stats()["shrinks"]
            self._last_trim = now
            heap.trim()

    def _update_state(self) -> None:
        if self.stopping:
            new = "stopping"
        elif not self.link.connected or not self.workers.slots:
            new = "starting"  # INTERFACE: starting = model loading or broker not (yet) connected
        elif self.workers.all_ready() and not self.workers.degraded_reason():
            new = "online"
        else:
            new = "degraded"
        reason = self.workers.degraded_reason() if new == "degraded" else None
        if new != self.state or reason != self.state_reason:
            logger.info("state %s -> %s%s", self.state, new, f" ({reason})" if reason else "")
            self.state, self.state_reason = new, reason
            name = self.workers.model_info.get("name")
            self.link.set_status(json.dumps({"state": new, "version": __version__, "model": name,
                                             **({"reason": reason} if reason else {}),
                                             "ts": round(time.time(), 3)}).encode())
            self.notifier.status(f"{new}: {name} on {self.workers.accel_info.get('chosen')}")

    def snapshot(self) -> dict[str, Any]:
        """The status JSON (edged.snapshot)."""
        return self.snap.take(self.cfg, self.state, self.state_reason, self.stalled)

    def _periodic(self, now: float) -> None:
        interval = self.cfg.status.interval
        if interval and now - self._last_stats >= interval:
            self._last_stats = now
            self.snap.publish(self.cfg, self.snapshot())
        wd = self.notifier.watchdog_interval()
        # pinged at a quarter of WatchdogSec: with the main loop's 0.25 s turn no gap reaches half of it
        if wd and now - self._last_watchdog >= wd / 2:
            self.stalled = self.progress.stalled(now, max(2 * wd, 2.0)) + self.workers.stalled(now)
            if not self.stalled:
                self._last_watchdog = now
                self.notifier.watchdog()

    def _io_beat(self) -> None:
        """On the I/O loop, twice a second: it turns, so it can serve (the watchdog checks this beat)."""
        self.progress.beat("io loop")
        if not self.stopping:
            self.loop.call_later(0.5, self._io_beat)

    # ---- signals, reload, main loop -----------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _on_connection(self, up: bool) -> None:
        if up:
            self.ha.on_connect()  # announce again after every (re)connect
            self.updates.connected()  # the retained P/model/state again
        else:
            self.results.connection_lost()
        self._wake()

    def _signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self.stopping = True
        self._wake()

    def _start_reload(self) -> None:
        """SIGHUP: reload on a thread of its own; the main loop keeps its timers whatever the reload waits for."""
        if self._reloading is not None and self._reloading.is_alive():
            logger.warning("SIGHUP: a reload is already under way; this one is ignored")
            return
        self._reloading = threading.Thread(target=self._reload_guarded, name="reload", daemon=True)
        self._reloading.start()

    def _reload_guarded(self) -> None:
        try:
            self.reload()
        except Exception:  # top of the reload thread: the old workers keep serving
            logger.exception("reload failed, still serving the previous model")
            self.notifier.ready("reload failed: still serving the previous model")

    def reload(self) -> None:
        """The new config and model in fresh workers, then the old ones retire (edged.switching)."""
        self.notifier.reloading()
        new_cfg = self.workers.switch.reload()
        if new_cfg is None:
            self.notifier.ready("reload failed: still serving the previous model")
            return
        self.cfg = new_cfg
        self.notifier.ready(f"reloaded: {self.workers.model_info.get('name')}")

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the exit status."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._signal)
        if needs_prometheus(self.cfg):
            key = "prometheus_file" if self.cfg.status.prometheus_file else "prometheus_port"
            raise ConfigError(f"{self.cfg.source} status.{key}: needs the prometheus-client package "
                              "(pip install 'edged[prometheus]')")
        try:
            self.status_server.start()
        except (OSError, EdgedError) as exc:
            raise ConfigError(
                f"{self.cfg.source} status.socket: cannot serve {self.cfg.status.socket}: {exc}"
            ) from None
        if self.cfg.status.prometheus_port:  # the optional HTTP /metrics listener
            from edged.prometheus import HttpExporter

            try:
                self.exporter = HttpExporter(self.cfg.source, self.cfg.status.prometheus_bind,
                                             self.cfg.status.prometheus_port, self.snapshot)
            except ConfigError:
                self.status_server.close()
                raise
        self.loop.start()
        try:
            self._start_workers()
        except (ModelError, WorkerError, ConfigError):
            self.status_server.close()
            self.loop.stop()
            raise
        self.updates.start()
        self.link.start()
        self.loop.call_soon(self._io_beat)
        if self.share is not None:
            self.share.start()
        dispatcher = threading.Thread(target=self.admission.dispatch_loop, name="dispatcher", daemon=True)
        dispatcher.start()
        ready_sent = False
        try:
            while not self.stopping:
                now = time.monotonic()
                self.progress.beat("main loop")
                if self._reload_requested:
                    self._reload_requested = False
                    self._start_reload()
                self.workers.check(now)
                self.workers.restart_due()
                self.updates.tick(now)
                self._upkeep_memory(now)
                self._update_state()
                if not ready_sent and (self.state == "online" or now - self.started > 10):
                    ready_sent = True
                    self.notifier.ready(f"{self.state}: {self.workers.model_info.get('name')}")
                self._periodic(now)
                self.ha.poll(now)  # birth republish, rate-limited labels
                if self.workers.fatal:
                    logger.critical("%s", self.workers.fatal)
                    return EX_SOFTWARE
                self._sleep(0.25)
            return self._drain()
        finally:
            self._shutdown()

    def _start_workers(self) -> None:
        """The store's current model (edged.updates), else the config's; a stored model that no longer loads
        is rolled back to the one before it, down to model.path (whose failure is exit 78)."""
        while True:
            self.workers.set_model(self.updates.open())
            try:
                self.workers.start_all()
                return
            except (ModelError, WorkerError) as exc:
                if self.workers.model is None:
                    raise
                self.updates.start_failed(exc)

    def _sleep(self, seconds: float) -> None:
        import select

        r, _, _ = select.select([self._wake_r], [], [], seconds)
        if r:
            try:
                os.read(self._wake_r, 4096)
            except OSError:
                pass

    def _drain(self) -> int:
        self.notifier.stopping()
        self._update_state()
        end = time.monotonic() + self.cfg.queue.drain_timeout_s
        # first stop taking the group's frames, serving all it already sent us
        if self.share is not None and not self.share.leave(self.cfg.queue.drain_timeout_s):
            logger.warning("drain: leaving the fleet's shared subscription did not finish in time")
        self.admission.stopping = True
        with self.cond:
            logger.info("stopping: draining %d queued and %d in-flight frame(s)", self.queue_depth(),
                        self.workers.inflight())
            self.cond.notify_all()
            while time.monotonic() < end and (self.queue_depth() or self.workers.inflight()):
                self.cond.wait(0.1)
            left = self.queue_depth() + self.workers.inflight()
        if left:
            logger.warning("drain timeout: %d frame(s) not answered; the broker redelivers them", left)
        return EX_OK

    def _shutdown(self) -> None:
        """The order of teardown: workers, the broker link (final status), the I/O loop, the socket, the pool."""
        self.stopping = True
        self.admission.stopping = True
        self.workers.stop_all(grace=2.0)
        if self.share is not None:
            self.share.stop()
        try:
            self.link.stop(json.dumps({"state": "stopped", "ts": round(time.time(), 3)}).encode())
        except Exception:  # teardown goes on whatever the broker does
            logger.debug("mqtt stop failed", exc_info=True)
        self.loop.stop()
        self.status_server.close()
        if self.exporter is not None:
            self.exporter.close()
        self.pool.close()
