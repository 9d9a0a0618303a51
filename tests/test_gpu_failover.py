"""The GPU worker killed mid-stream: fail-over to the CPU and back (issue 19, point 8).

Runs only where LiteRT's GPU accelerator has a Vulkan adapter (the lent GPU machine, see
tools/gpu_check.sh); elsewhere it skips with the reason, and the same rules are exercised with the
fake delegate in tests/test_health.py. Real daemon, broker, sandboxed workers, MobileNet v2 on the
cat image. Figures are printed as `FIGURE name=value` lines (pytest -s).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from conftest import Client, shared, until
from edged import runtime
from test_accel import _gpu_or_skip
from test_health import Stream


def _cpu_top1(model: Path, image: Path) -> int:
    """The CPU's top-1 class id for the image (what every answer must carry)."""
    import numpy as np
    from PIL import Image
    m = runtime.Model(str(model))
    h, w = m.input.shape[1:3]
    x = np.asarray(Image.open(image).convert("RGB").resize((w, h), Image.Resampling.BILINEAR), np.uint8)[None]
    m.set_input(x)
    m.invoke()
    return int(np.argmax(m.output(0).reshape(-1)))


def _ordered(c: Client) -> list[dict[str, Any]]:
    with c.cv:
        return list(c.results.values())


def _first_on(c: Client, kind: str, after: int) -> int | None:
    rs = _ordered(c)
    return next((i for i in range(after, len(rs)) if rs[i].get("accelerator") == kind and "error" not in rs[i]),
                None)


def test_gpu_worker_killed_mid_stream_fails_over_to_cpu_and_back(daemon_factory, client_factory):
    mnv2, cat, labels = (shared(n) for n in ("mobilenet_v2_1.0_224_quant.tflite", "cat.bmp", "imagenet_labels.txt"))
    _gpu_or_skip(str(mnv2))
    top1 = _cpu_top1(mnv2, cat)
    d = daemon_factory({
        "model": {"path": str(mnv2), "labels": str(labels), "task": "classify", "top_k": 3},
        "accelerator": {"prefer": ["gpu", "cpu"],
                        "health": {"failures": 1, "window_s": 120, "probe_s": 2, "probe_max_s": 4}},
        "sandbox": {"frame_timeout_s": 5, "heartbeat_s": 0.5, "backoff_max_s": 1},
    })
    st = d.status()
    assert st["accelerator"]["chosen"] == "gpu", st["accelerator"]
    c = client_factory(d.prefix)
    stream = Stream(c, period=0.02, payload=cat.read_bytes(), content_type="image/bmp")
    until(lambda: len(_ordered(c)) >= 30, 60, "30 results on the GPU", detail=lambda: d.log()[-2500:])
    assert all(r.get("accelerator") == "gpu" for r in _ordered(c)), _ordered(c)[:3]
    pid = d.status()["workers"][0]["pid"]
    n_kill, t_kill = len(_ordered(c)), time.monotonic()
    os.kill(pid, signal.SIGKILL)
    cpu_i = until(lambda: _first_on(c, "cpu", n_kill), 60, "a result from the CPU", detail=lambda: d.log()[-2500:])
    failover = time.monotonic() - t_kill
    st = d.wait_state("degraded", 20)
    assert "gpu set aside" in (st["state_reason"] or ""), st
    # the GPU itself is fine: the next probe passes and the workers move back
    back_i = until(lambda: _first_on(c, "gpu", cpu_i), 60, "a result on the GPU again",
                   detail=lambda: d.log()[-2500:])
    failback = time.monotonic() - t_kill
    until(lambda: len(_ordered(c)) > back_i + 30, 60, "30 more results")
    ids = stream.stop()
    got = c.wait(ids, 60)
    missing = [i for i, r in got.items() if r is None]
    assert not missing, f"{len(missing)} frames never answered, e.g. {missing[:5]}"
    errors = [r for r in got.values() if r and "error" in r]
    assert not errors, f"{len(errors)} error answers, e.g. {errors[:2]}"
    assert c.count == len(c.results), f"{c.count - len(c.results)} frames answered twice"
    assert all(r and r["classes"][0]["id"] == top1 for r in got.values()), "a wrong top-1 was published"
    kinds = [r["accelerator"] for r in got.values() if r]
    st = d.wait_state("online", 30)
    assert st["accelerator"]["chosen"] == "gpu" and st["accelerator"]["set_aside"] == [], st["accelerator"]
    assert d.proc is not None and d.proc.poll() is None
    print(f"\nFIGURE gpu_failover_s={failover:.2f} (SIGKILL of the GPU worker to the first CPU result, <=)")
    print(f"FIGURE gpu_failback_s={failback:.2f} (SIGKILL to the first GPU result again; probe_s 2)")
    print(f"FIGURE gpu_frames={len(ids)} on_gpu={kinds.count('gpu')} on_cpu={kinds.count('cpu')} lost=0 errors=0")
