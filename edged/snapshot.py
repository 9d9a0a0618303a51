"""The status snapshot: one dict of the daemon's state, and where the periodic one goes.

Its shape is INTERFACE's (the status JSON), served by `edged status` (the
socket), the Prometheus listener and, every status.interval, published: P/stats,
Home Assistant's stats entity, status.prometheus_file. It reads the owners it
was given (worker slots, admission, metrics, pool, the MQTT links, model
updates) under the supervisor's one lock where they need it, and the memory of
each process from psutil (imported when a snapshot is taken, so that importing
the daemon stays light). It changes nothing it reads.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edged import __version__, config
from edged.metrics import write_prometheus

if TYPE_CHECKING:
    from edged.admission import Admission
    from edged.fleet import ShareLink
    from edged.metrics import Metrics
    from edged.mqtt import MqttLink
    from edged.pool import FramePool
    from edged.results import Results
    from edged.supervision import Slot, Workers
    from edged.updates import ModelUpdates

logger = logging.getLogger(__name__)


def needs_prometheus(cfg: config.Config) -> bool:
    """True when Prometheus output is configured but its library is missing."""
    if not cfg.status.prometheus_file and not cfg.status.prometheus_port:
        return False
    import importlib.util

    return importlib.util.find_spec("prometheus_client") is None


class Snapshot:
    """Takes the snapshot from the daemon's owners; the daemon passes what is its own (config, state, watchdog)."""

    def __init__(self, cond: threading.Condition, workers: Workers, admission: Admission, metrics: Metrics,
                 pool: FramePool, link: MqttLink, results: Results, share: ShareLink | None,
                 updates: ModelUpdates, started: float, *, on_stats: Callable[[dict[str, Any]], None]) -> None:
        self.cond, self.workers, self.admission, self.metrics = cond, workers, admission, metrics
        self.pool, self.link, self.results, self.share, self.updates = pool, link, results, share, updates
        self.started, self.on_stats = started, on_stats

    def publish(self, cfg: config.Config, st: dict[str, Any]) -> None:
        """The periodic snapshot out: P/stats, on_stats (Home Assistant's entity), status.prometheus_file."""
        self.link.publish_stats(json.dumps(st).encode())
        self.on_stats(st)
        if cfg.status.prometheus_file:
            try:
                write_prometheus(cfg.status.prometheus_file, st)
            except OSError as exc:
                logger.warning("status.prometheus_file: %s", exc)

    def take(self, cfg: config.Config, state: str, state_reason: str | None, stalled: list[str]) -> dict[str, Any]:
        with self.cond:
            workers = [_worker_row(s) for s in self.workers.slots]
            accelerator = {**self.workers.accel_info, **self.workers.accelerator_report()}
            depth = self.admission.depth()
            streams = self.admission.streams()
        mem = _memory(workers)
        m = self.metrics.snapshot()
        model = self.workers.model_info
        return {
            "state": state,
            "state_reason": state_reason,
            "version": __version__,
            "device_id": cfg.device_id,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "model": {k: model.get(k) for k in ("name", "path", "task", "input", "outputs", "backend")},
            "accelerator": accelerator,
            "frames": m["frames"],
            "errors_by_code": m["errors_by_code"],
            "latency_ms": m["latency_ms"],
            "stages_ms": m["stages_ms"],
            "queue_depth": depth,
            "streams_queued": streams,
            "watchdog": {"stalled": stalled},
            "pool": self.pool.stats(),
            "workers": workers,
            "memory": mem,
            "mqtt": {
                "connected": self.link.connected,
                "reconnects": self.link.reconnects,
                "result_overflows": self.link.overflows,
                # frames the broker sent again after a reconnect that were answered or in hand already
                "redelivered": self.link.redelivered_acked + self.link.redelivered_dropped,
                "results_waiting": len(self.results.waiting),
                "results_unacked": self.link.held(),
                "unrouted": self.link.unrouted,
                "oversized_packets": self.link.oversized,
                "broker": f"{cfg.mqtt.host}:{cfg.mqtt.port}",
                "share": self.share.stats() if self.share is not None else None,
            },
            "model_update": self.updates.status(),
        }


def _worker_row(s: Slot) -> dict[str, Any]:
    """One slot as status shows it (under the lock)."""
    return {"index": s.index, "pid": s.handle.pid if s.handle else None,
            "state": s.handle.state if s.handle else "absent", "restarts": s.restarts,
            "sandboxed": bool(s.handle and s.handle.info.get("sandboxed")),
            "sandbox_profile": s.handle.info.get("sandbox_profile") if s.handle else None,
            "inflight": len(s.handle.inflight) if s.handle else 0, "last_exit": s.last_exit,
            "served": s.handle.served if s.handle else 0,
            "batch_max": int(s.handle.info.get("batch", 1)) if s.handle else 1,
            "batched": s.handle.batched if s.handle else 0,
            "accelerator": s.handle.accelerator if s.handle else None,
            "model": s.handle.model_name if s.handle else None,
            "selftest": s.handle.selftest.report() if s.handle and s.handle.selftest else None}


def _memory(workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The RSS of the daemon and of each worker (a worker gone meanwhile: 0); each row gets its rss_bytes too."""
    import psutil

    mem: dict[str, Any] = {"rss_bytes": psutil.Process().memory_info().rss, "workers": {}}
    for w in workers:
        try:
            w["rss_bytes"] = psutil.Process(int(w["pid"])).memory_info().rss if w["pid"] else 0
        except psutil.Error:
            w["rss_bytes"] = 0
        mem["workers"][str(w["pid"])] = w["rss_bytes"]
    return mem
