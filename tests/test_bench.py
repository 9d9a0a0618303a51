"""`edged bench` runs every path and reports ratios (no timing assertions: speed is measured, not unit-tested)."""
from __future__ import annotations

import json
import subprocess

from conftest import ROOT, edged_cmd


def test_bench_json_reports_every_path_with_ratios_and_footprint():
    r = subprocess.run(edged_cmd("bench", "-c", str(ROOT / "configs" / "edged.yaml"), "--json", "--frames", "25"),
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert set(rep["paths"]) == {"raw", "inproc", "worker", "sandboxed", "e2e"}
    for name, p in rep["paths"].items():
        assert p["fps"] > 0 and p["p50_ms"] <= p["p99_ms"], (name, p)
        assert "ratio_vs_raw" in p and "cpu_ms_per_frame" in p
    e2e = rep["paths"]["e2e"]
    assert e2e["supervisor_pss_mb"] > 0 and len(e2e["workers_pss_mb"]) == 1 and e2e["cold_start_s"] > 0
    assert "sandboxed_vs_inproc" in rep and "e2e_added_ms_per_frame" in rep


def test_bench_with_batching_adds_the_batch_paths_and_gains(tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text(f"model:\n  path: {ROOT / 'tests' / 'data' / 'digits_batch.tflite'}\n  batch_max: 4\n")
    r = subprocess.run(edged_cmd("bench", "-c", str(cfg), "--json", "--frames", "40"),
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert {"raw_batch", "e2e", "e2e_nobatch"} <= set(rep["paths"]), rep["paths"].keys()
    assert rep["batch_max"] == 4 and rep["batch_gain_raw"] > 0 and rep["batch_gain_e2e"] > 0
    assert rep["in_flight_e2e"] == 8


def test_bench_batching_on_a_fixed_batch_model_says_why_it_is_off(tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text(f"model:\n  path: {ROOT / 'edged' / 'models' / 'digits.tflite'}\n  batch_max: 4\n")
    r = subprocess.run(edged_cmd("bench", "-c", str(cfg), "--json", "--frames", "10", "--no-e2e"),
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert "raw_batch" not in rep["paths"] and "fixed" in rep["notes"]["raw_batch"]
