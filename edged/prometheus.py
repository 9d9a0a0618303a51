"""Prometheus exposition of the status: the only module that imports prometheus-client.

One function of the status JSON (edged status --json) gives every metric, so
the textfile (status.prometheus_file, for node_exporter) and the HTTP listener
(status.prometheus_port) say the same. Names follow Prometheus conventions:
base units in the name (seconds, bytes, ratio), counters end in _total,
per-stage latency is a histogram (_bucket, _sum, _count), states and
accelerators are labels of 0/1 gauges. `promtool check metrics` accepts it
(tests/test_prometheus.py).
"""
from __future__ import annotations

import logging
from typing import Any
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from edged.errors import ConfigError

logger = logging.getLogger(__name__)

STATES = ("starting", "online", "degraded", "stopping")
# error codes always exported (0 until seen), so rate() and alerts work before the first error
ERROR_CODES = ("bad_payload", "too_large", "inference_failed", "worker_crashed", "timeout", "overloaded",
               "expired", "bad_request", "internal_error")
FRAME_COUNTERS = {"received": "frames taken from MQTT", "completed": "frames answered with a result",
                  "dropped": "frames dropped by the queue policy (answered overloaded)",
                  "expired": "frames whose message expiry passed before inference",
                  "too_large": "frames refused as too large"}


def _num(v: Any) -> float:
    try:
        return float(v or 0)
    except (TypeError, ValueError):
        return 0.0


def metrics(st: dict[str, Any]) -> Iterator[Metric]:
    """Every metric family of one status snapshot."""
    model = st.get("model") or {}
    info = GaugeMetricFamily("edged_info", "edged's version, device and model (always 1)",
                             labels=["version", "device_id", "model", "task", "backend"])
    info.add_metric([str(st.get("version", "")), str(st.get("device_id", "")), str(model.get("name") or ""),
                     str(model.get("task") or ""), str(model.get("backend") or "")], 1)
    yield info
    state = GaugeMetricFamily("edged_state", "1 for the daemon's current state, 0 for the others",
                              labels=["state"])
    for s in STATES:
        state.add_metric([s], 1 if st.get("state") == s else 0)
    yield state
    yield GaugeMetricFamily("edged_uptime_seconds", "seconds since the daemon started", value=_num(st.get("uptime_s")))

    frames = st.get("frames") or {}
    for key, help_ in FRAME_COUNTERS.items():
        yield CounterMetricFamily(f"edged_frames_{key}", help_, value=_num(frames.get(key)))
    errs = CounterMetricFamily("edged_frame_errors", "frames answered with an error result, by error code",
                               labels=["code"])
    codes = dict.fromkeys(ERROR_CODES, 0) | dict(st.get("errors_by_code") or {})
    for code, n in sorted(codes.items()):
        errs.add_metric([str(code)], _num(n))
    yield errs

    hist = HistogramMetricFamily("edged_stage_latency_seconds",
                                 "latency of each stage of a frame (queue, preprocess, inference, publish, total)",
                                 labels=["stage"])
    for stage, s in (st.get("stages_ms") or {}).items():
        le = s.get("le_ms") if isinstance(s, dict) else None
        if not isinstance(le, dict):
            continue
        buckets = [("+Inf" if k == "+Inf" else f"{float(k) / 1e3:g}", _num(v)) for k, v in le.items()]
        hist.add_metric([str(stage)], buckets, sum_value=_num(s.get("sum_ms")) / 1e3)
    yield hist
    yield GaugeMetricFamily("edged_queue_depth", "frames waiting for a worker", value=_num(st.get("queue_depth")))

    pool = st.get("pool") or {}
    for key in ("capacity_bytes", "used_bytes", "high_water_bytes"):
        yield GaugeMetricFamily(f"edged_pool_{key}", f"frame pool {key.replace('_bytes', '').replace('_', ' ')}",
                                value=_num(pool.get(key)))
    yield GaugeMetricFamily("edged_pool_fragmentation_ratio", "frame pool fragmentation (0..1)",
                            value=_num(pool.get("fragmentation")))
    yield CounterMetricFamily("edged_pool_grows", "segments added to the frame pool", value=_num(pool.get("grows")))
    yield CounterMetricFamily("edged_pool_shrinks", "segments given back by the frame pool",
                              value=_num(pool.get("shrinks")))

    mqtt = st.get("mqtt") or {}
    yield GaugeMetricFamily("edged_mqtt_connected", "1 while connected to the broker",
                            value=1 if mqtt.get("connected") else 0)
    yield CounterMetricFamily(
        "edged_mqtt_reconnects", "reconnections to the broker", value=_num(mqtt.get("reconnects"))
    )
    yield CounterMetricFamily("edged_mqtt_result_overflows", "results not held while the broker was away "
                              "(mqtt.result_buffer full)", value=_num(mqtt.get("result_overflows")))
    yield CounterMetricFamily("edged_mqtt_redelivered", "frames the broker sent again after a reconnect that "
                              "were answered or in hand already (not run twice)", value=_num(mqtt.get("redelivered")))

    yield from _accelerator(st.get("accelerator") or {})
    yield from _workers(st)


def _one_per_kind(name: str, text: str, entries: Any) -> Metric:
    """A gauge of 1 for each {"kind": ...} entry of a status list (entries of another shape are skipped)."""
    gauge = GaugeMetricFamily(name, text, labels=["kind"])
    for e in entries or []:
        if isinstance(e, dict):
            gauge.add_metric([str(e.get("kind"))], 1)
    return gauge


def _accelerator(acc: dict[str, Any]) -> Iterator[Metric]:
    chosen = GaugeMetricFamily("edged_accelerator_info", "the accelerator serving (always 1)", labels=["kind"])
    chosen.add_metric([str(acc.get("chosen") or "none")], 1)
    yield chosen
    yield _one_per_kind("edged_accelerator_skipped", "1 for each preferred accelerator that was not used",
                        acc.get("skipped"))
    if "set_aside" in acc:  # accelerator health (wave 2): present once the daemon reports it
        yield _one_per_kind("edged_accelerator_set_aside", "1 for each accelerator set aside after failures",
                            acc.get("set_aside"))
    kinds = acc.get("kinds") if isinstance(acc.get("kinds"), dict) else {}
    if kinds:  # accelerator health: failures, frames and inference time per accelerator kind
        fails = CounterMetricFamily("edged_accelerator_failures", "failures of each accelerator since start, by cause",
                                    labels=["kind", "cause"])
        served = CounterMetricFamily("edged_accelerator_frames", "frames served on each accelerator", labels=["kind"])
        inf = GaugeMetricFamily("edged_accelerator_inference_seconds", "mean inference time on each accelerator",
                                labels=["kind"])
        for kind, k in kinds.items():
            if not isinstance(k, dict):
                continue
            for cause, n in (k.get("failures") or {}).items():
                fails.add_metric([str(kind), str(cause)], _num(n))
            served.add_metric([str(kind)], _num(k.get("frames")))
            if isinstance(k.get("inference_ms_mean"), (int, float)):
                inf.add_metric([str(kind)], k["inference_ms_mean"] / 1e3)
        yield fails
        yield served
        yield inf
    if isinstance(acc.get("temperature_c"), (int, float)):
        yield GaugeMetricFamily("edged_accelerator_temperature_celsius", "the accelerator's temperature",
                                value=float(acc["temperature_c"]))


def _workers(st: dict[str, Any]) -> Iterator[Metric]:
    rss = GaugeMetricFamily("edged_resident_memory_bytes", "resident memory of the daemon and of each worker",
                            labels=["process"])
    rss.add_metric(["supervisor"], _num((st.get("memory") or {}).get("rss_bytes")))
    up = GaugeMetricFamily("edged_worker_up", "1 while the worker is ready for frames", labels=["worker"])
    restarts = CounterMetricFamily("edged_worker_restarts", "restarts of the worker", labels=["worker"])
    selftest = GaugeMetricFamily("edged_worker_selftest_pass", "1 when the worker's last self-test passed",
                                 labels=["worker"])
    any_selftest = False
    for w in st.get("workers") or []:
        if not isinstance(w, dict):
            continue
        i = str(w.get("index"))
        rss.add_metric([f"worker{i}"], _num(w.get("rss_bytes")))
        up.add_metric([i], 1 if w.get("state") == "ready" else 0)
        restarts.add_metric([i], _num(w.get("restarts")))
        if isinstance(w.get("selftest"), dict):
            any_selftest = True
            selftest.add_metric([i], 1 if w["selftest"].get("result") == "pass" else 0)
    yield rss
    yield up
    yield restarts
    if any_selftest:
        yield selftest


class _Collector:
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return metrics(self.snapshot())


def registry(snapshot: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(snapshot))
    return reg


def write_textfile(path: str, status: dict[str, Any]) -> None:
    """The status as Prometheus text in `path`, for node_exporter's textfile collector (atomic rename)."""
    write_to_textfile(path, registry(lambda: status))


class HttpExporter:
    """GET /metrics on status.prometheus_bind:status.prometheus_port, from a live snapshot at each scrape."""

    def __init__(self, cfg_source: str, bind: str, port: int, snapshot: Callable[[], dict[str, Any]]) -> None:
        try:
            self.server, self.thread = start_http_server(port, addr=bind, registry=registry(snapshot))
        except OSError as exc:
            raise ConfigError(f"{cfg_source} status.prometheus_port: cannot listen on {bind}:{port}: "
                              f"{exc.strerror or exc}") from None
        logger.info("Prometheus metrics on http://%s:%d/metrics", bind, port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
