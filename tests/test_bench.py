"""`edged bench` runs every path and reports ratios (no timing assertions: speed is measured, not unit-tested)."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import ROOT, edged_cmd


def assert_ratios_consistent(rep: dict) -> None:
    """Each path's ratio to raw is its throughput over raw's, as reported (ratio_vs_raw is computed from the
    raw counts, fps is rounded: they agree within the rounding). Fails when a path reports what it did not measure."""
    P = rep["paths"]
    assert P["raw"]["ratio_vs_raw"] == 1.0, P["raw"]
    for name, p in P.items():
        assert p["fps"] > 0 and 0 < p["p50_ms"] <= p["p95_ms"] <= p["p99_ms"], (name, p)
        assert p["ratio_vs_raw"] == pytest.approx(p["fps"] / P["raw"]["fps"], rel=0.01, abs=2e-3), (name, p)
        assert p["ms_per_frame"] == pytest.approx(1e3 / p["fps"], rel=0.01, abs=1e-3), (name, p)
        assert "cpu_ms_per_frame" in p, (name, p)  # CPU time comes in clock ticks: 25 raw frames may show 0


def test_bench_json_reports_every_path_with_ratios_and_footprint():
    r = subprocess.run(edged_cmd("bench", "-c", str(ROOT / "configs" / "edged.yaml"), "--json", "--frames", "25",
                                 "--open-loop-s", "0.1"), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert set(rep["paths"]) == {"raw", "inproc", "worker", "sandboxed", "e2e"}
    # the open-loop curve: each load's rate from the closed-window capacity, every frame answered
    curve = rep["open_loop_e2e"]
    assert [row["load"] for row in curve] == [0.25, 0.5, 0.75, 1.0], curve
    for row in curve:
        assert row["rate_fps"] == pytest.approx(max(1.0, rep["paths"]["e2e"]["fps"] * row["load"]), rel=0.02, abs=0.2)
        assert abs(row["frames"] - max(50, int(row["rate_fps"] * 0.1))) <= 1 and row["achieved_fps"] > 0, row
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"], row
    assert rep["frames_per_path"] == 25, rep["frames_per_path"]  # --frames 25 in 5 rounds
    assert_ratios_consistent(rep)
    P = rep["paths"]
    e2e = P["e2e"]
    assert e2e["supervisor_pss_mb"] > 0 and len(e2e["workers_pss_mb"]) == 1 and e2e["cold_start_s"] > 0
    assert rep["sandboxed_vs_inproc"] == round(P["sandboxed"]["fps"] / P["inproc"]["fps"], 3)
    assert rep["e2e_added_ms_per_frame"] == round(e2e["ms_per_frame"] - P["raw"]["ms_per_frame"], 3)


def test_bench_with_batching_adds_the_batch_paths_and_gains(tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text(f"model:\n  path: {ROOT / 'tests' / 'data' / 'digits_batch.tflite'}\n  batch_max: 4\n")
    r = subprocess.run(edged_cmd("bench", "-c", str(cfg), "--json", "--frames", "40"),
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert {"raw_batch", "e2e", "e2e_nobatch"} <= set(rep["paths"]), rep["paths"].keys()
    assert rep["batch_max"] == 4 and rep["in_flight_e2e"] == 8
    assert_ratios_consistent(rep)
    # each gain is the batched path's throughput over its unbatched twin, measured in the same rounds (a ratio,
    # not a speed threshold: speed is measured, not unit-tested)
    P = rep["paths"]
    assert rep["batch_gain_raw"] == pytest.approx(P["raw_batch"]["fps"] / P["raw"]["fps"], rel=0.01), rep
    assert rep["batch_gain_e2e"] == pytest.approx(P["e2e"]["fps"] / P["e2e_nobatch"]["fps"], rel=0.01), rep


def test_bench_batching_on_a_fixed_batch_model_says_why_it_is_off(tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text(f"model:\n  path: {ROOT / 'edged' / 'models' / 'digits.tflite'}\n  batch_max: 4\n")
    r = subprocess.run(edged_cmd("bench", "-c", str(cfg), "--json", "--frames", "10", "--no-e2e"),
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert "raw_batch" not in rep["paths"] and "fixed" in rep["notes"]["raw_batch"]
