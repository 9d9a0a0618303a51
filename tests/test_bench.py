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
