"""What the known-answer self-test costs a worker's start, per model (README "Accelerator health").

    .venv/bin/python tools/selftest_cost.py [--starts N] MODEL [MODEL ...]

For each model: N sandboxed CPU workers are started as the daemon starts
them; for each, the worker's own time for the self-test frames (Ready.selftest.ms:
preprocess and invoke of each frame, and the outputs copied out), the
supervisor's comparison (edged.selftest.check) and the whole start, so the
self-test's share of a start shows. Medians over the starts, as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edged import config, selftest
from edged.workerinit import init_message, read_config_text
from edged.workers import WorkerHandle


def measure(model: str, starts: int, frames: list[str]) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "edged.yaml"
        path.write_text(yaml.safe_dump({"model": {"path": model, "labels": None, "task": "raw" if "detect" in model
                                                  else "classify", "selftest": {"frames": frames}},
                                        "state_dir": tmp}))
        cfg = config.load(path)
        text = read_config_text(cfg)
        run_ms, check_ms, start_ms = [], [], []
        expected = None
        for _ in range(starts):
            h = WorkerHandle(0, init_message(cfg, text), lambda *_a: None, lambda _h: None)
            t0 = time.perf_counter()
            h.start()
            start_ms.append((time.perf_counter() - t0) * 1e3)
            try:
                rep = h.info["selftest"]
                expected = expected or selftest.Expected(rep["outputs"], rep["frames"], "first start")
                t1 = time.perf_counter()
                v = selftest.check(h, expected, cfg.model.selftest.tolerance, cfg.model.score_threshold)
                check_ms.append((time.perf_counter() - t1) * 1e3)
                run_ms.append(float(rep["ms"]))
                assert v.passed, v
            finally:
                h.stop()
        values = sum(len(o) for o in expected.outputs[0]) if expected else 0
        return {"model": Path(model).name, "frames": len(frames) or 1, "values_compared": values, "starts": starts,
                "selftest_worker_ms": round(statistics.median(run_ms), 2),
                "compare_ms": round(statistics.median(check_ms), 3),
                "worker_start_ms": round(statistics.median(start_ms), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--starts", type=int, default=5)
    ap.add_argument("--frame", action="append", default=[], help="a self-test frame file (default: the built one)")
    args = ap.parse_args()
    for m in args.models:
        print(json.dumps(measure(str(Path(m).resolve()), args.starts, [str(Path(f).resolve()) for f in args.frame])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
