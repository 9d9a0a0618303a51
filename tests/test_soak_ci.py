"""The soak harness in CI mode: two minutes of mixed load on a real daemon and broker, with SIGHUP
reloads, a worker SIGKILL and a broker restart; every frame answered, nothing growing.

Runs in the normal `pytest` run (`make test`): about 2.5 minutes. tools/soak.py exits non-zero on
a lost frame, a wrong answer, fd or thread growth, or memory slope over the CI threshold; the
verdict it writes is checked here as well.
"""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_soak_ci_two_minutes_with_faults_every_frame_answered(tmp_path):
    out = tmp_path / "soak"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "soak.py"), "--ci", "--minutes", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=420, cwd=ROOT)
    verdict_path = out / "verdict.json"
    assert verdict_path.exists(), f"no verdict (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    v = json.loads(verdict_path.read_text())
    failed = [c for c in v["checks"] if c["result"] == "fail"]
    assert r.returncode == 0, f"soak failed {failed}:\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
    assert v["pass"] is True
    f = v["frames"]
    assert f["sent"] == f["answered"] and f["lost"] == 0, f
    assert f["sent"] > 500, f
    assert f["errors_by_code_bad_frames"].get("bad_payload", 0) > 0, f  # the bad frames really went in
    faults = v["faults"]
    assert faults["reload"]["recovered"] >= 2 and faults["kill"]["recovered"] == 1, faults
    assert faults["broker_restart"]["recovered"] == 1, faults
    assert (out / "samples.csv").read_text().count("\n") > 30
