"""edged.metrics: log-bucket histogram percentiles against numpy, counters, Prometheus text."""
from __future__ import annotations

import json
import math
import re
import threading

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from edged.metrics import STAGES, Histogram, Metrics

QS = (50, 90, 95, 99)


def histogram_of(values) -> Histogram:
    h = Histogram()
    for v in values:
        h.observe(float(v))
    return h


@pytest.mark.parametrize("seed, median_ms, sigma", [(1, 20.0, 0.5), (2, 2.0, 1.2), (3, 300.0, 0.3)])
def test_histogram_percentiles_within_10_percent_of_numpy(seed, median_ms, sigma):
    latencies = np.random.default_rng(seed).lognormal(math.log(median_ms), sigma, 20_000)
    h = histogram_of(latencies)
    for q in QS:
        want = float(np.percentile(latencies, q))
        got = h.percentile(q)
        assert abs(got - want) <= 0.10 * want, (q, got, want)


def test_histogram_percentiles_uniform_latencies_within_10_percent():
    latencies = np.random.default_rng(4).uniform(1.0, 50.0, 5_000)
    h = histogram_of(latencies)
    for q in QS:
        want = float(np.percentile(latencies, q))
        assert abs(h.percentile(q) - want) <= 0.10 * want


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.floats(0.06, 90_000.0), min_size=1, max_size=200), st.sampled_from([1, 25, 50, 95, 99, 100]))
def test_histogram_percentile_bounds_nearest_rank_from_above(values, q):
    """The answer is the upper bound of the bucket of the nearest-rank value: never below it, < 10% above."""
    exact = float(np.percentile(np.array(values), q, method="inverted_cdf"))
    got = histogram_of(values).percentile(q)
    assert exact - 5e-4 <= got <= exact * 1.1 + 5e-4, (exact, got)


def test_histogram_empty_gives_zeros():
    h = Histogram()
    assert [h.percentile(q) for q in QS] == [0.0] * len(QS)
    assert h.summary() == {"p50": 0.0, "p95": 0.0, "p99": 0.0, "mean": 0.0, "count": 0}


def test_histogram_summary_one_observation():
    s = histogram_of([12.0]).summary()
    assert s["count"] == 1 and s["mean"] == 12.0
    assert 12.0 <= s["p50"] == s["p95"] == s["p99"] < 13.2


def test_metrics_counts_errors_and_observations():
    m = Metrics()
    m.count("received", 3)
    m.count("dropped")
    m.error("timeout")
    m.error("timeout")
    m.error("bad_payload")
    m.observe({"queue": 0.2, "inference": 15.0, "total": 20.0, "unknown_stage": 1.0})
    snap = m.snapshot()
    assert snap["frames"]["received"] == 3 and snap["frames"]["dropped"] == 1
    assert snap["frames"]["errors"] == 3 and snap["frames"]["completed"] == 1
    assert snap["errors_by_code"] == {"timeout": 2, "bad_payload": 1}
    assert snap["latency_ms"]["count"] == 1 and 20.0 <= snap["latency_ms"]["p50"] < 22.0
    assert set(snap["stages_ms"]) == set(STAGES) and snap["stages_ms"]["publish"]["count"] == 0
    json.dumps(snap, allow_nan=False)


def test_metrics_concurrent_counts_are_not_lost():
    m = Metrics()

    def work() -> None:
        for _ in range(2_000):
            m.count("received")
            m.observe({"total": 5.0})

    threads = [threading.Thread(target=work, name=f"w{i}") for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = m.snapshot()
    assert snap["frames"]["received"] == 8_000 and snap["latency_ms"]["count"] == 8_000


# -- Prometheus text ---------------------------------------------------------------------------------

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def parse_prometheus(text: str) -> dict[str, float]:
    """A strict reader of the exposition format's simple subset: HELP and TYPE before each family."""
    values: dict[str, float] = {}
    helped: set[str] = set()
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, help_ = line[len("# HELP "):].split(" ", 1)
            assert help_.strip(), line
            helped.add(name)
        elif line.startswith("# TYPE "):
            name, kind = line[len("# TYPE "):].split(" ")
            assert kind in ("gauge", "counter", "histogram", "summary", "untyped"), line
            typed[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"not a 'name value' line: {line!r}"
            name = m.group(1)
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in typed else name
            assert family in helped and family in typed, f"{name} has no HELP/TYPE before it"
            if family != name:
                assert typed[family] in ("histogram", "summary"), line
            k = key(name, **labels)
            assert k not in values, f"{k} twice"
            values[k] = float(m.group(3))
    return values


def key(name: str, **labels: str) -> str:
    """One spelling per series, whatever order the writer put the labels in."""
    return name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")


def status_like() -> dict:
    m = Metrics()
    m.count("received", 5)
    m.error("bad_payload")
    for ms in (10.0, 12.0, 30.0):
        m.observe({"queue": 0.1, "preprocess": 1.0, "inference": ms, "publish": 0.3, "total": ms + 2})
    return {**m.snapshot(), "queue_depth": 3, "uptime_s": 12.5, "mqtt": {"connected": True, "reconnects": 0},
            "pool": {"capacity_bytes": 1 << 20, "used_bytes": 4096, "high_water_bytes": 8192, "fragmentation": 0.25,
                     "grows": 1, "shrinks": 0},
            "memory": {"rss_bytes": 50_000_000}, "workers": [{"index": 0, "pid": 123, "rss_bytes": 40_000_000}]}


def prometheus_file(tmp_path, status: dict) -> str:
    pytest.importorskip("prometheus_client", reason="the optional prometheus extra is not installed")
    from edged.metrics import write_prometheus

    path = tmp_path / "edged.prom"
    write_prometheus(str(path), status)
    return path.read_text()


def test_write_prometheus_has_help_type_and_parses_as_name_value_lines(tmp_path):
    text = prometheus_file(tmp_path, status_like())
    assert text.endswith("\n")
    values = parse_prometheus(text)
    assert values["edged_frames_received_total"] == 5.0
    assert values[key("edged_frame_errors_total", code="bad_payload")] == 1.0
    assert values[key("edged_frame_errors_total", code="timeout")] == 0.0  # known codes exported before they happen
    assert values["edged_frames_completed_total"] == 3.0
    assert values["edged_queue_depth"] == 3.0 and values["edged_mqtt_connected"] == 1.0
    assert values["edged_uptime_seconds"] == 12.5
    assert values["edged_pool_capacity_bytes"] == float(1 << 20)
    assert values["edged_pool_fragmentation_ratio"] == 0.25 and values["edged_pool_grows_total"] == 1.0
    assert values[key("edged_resident_memory_bytes", process="worker0")] == 40_000_000.0


def test_stage_latency_histograms_count_exactly_per_bucket_in_seconds(tmp_path):
    m = Metrics()
    for ms in (0.3, 10.0, 10.01, 24.0, 31_000.0):  # 10.0 lies on a bound: counted in le=0.01
        m.observe({"inference": ms})
    values = parse_prometheus(prometheus_file(tmp_path, {**m.snapshot(), "queue_depth": 0}))
    b = lambda le, stage="inference": values[key("edged_stage_latency_seconds_bucket", le=le, stage=stage)]  # noqa: E731
    assert (b("0.0005"), b("0.005"), b("0.01"), b("0.025"), b("30"), b("+Inf")) == (1, 1, 2, 4, 4, 5)
    assert values[key("edged_stage_latency_seconds_count", stage="inference")] == 5
    assert abs(values[key("edged_stage_latency_seconds_sum", stage="inference")] - 31.04431) < 1e-6
    for stage in STAGES:  # every stage has a histogram, observed or not
        assert values[key("edged_stage_latency_seconds_bucket", le="+Inf", stage=stage)] == (5 if stage == "inference"
                                                                                            else 0)


def test_write_prometheus_minimal_status_still_parses(tmp_path):
    values = parse_prometheus(prometheus_file(tmp_path, {}))
    assert values["edged_queue_depth"] == 0.0 and values["edged_mqtt_connected"] == 0.0
    assert values["edged_uptime_seconds"] == 0.0
