"""Batching (model.batch_max): several waiting frames in one invoke, on a model whose batch dimension resizes.

tests/data/digits_batch.tflite is the bundled digits network converted with a free batch dimension
(tools/build_model.py); the bundled digits.tflite and the third-party models have a fixed one.
"""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import BUNDLED, DATA, edged_cmd
from edged import postprocess
from edged.runtime import Model, RowView

BATCH_MODEL = str(DATA / "digits_batch.tflite")


def _frames(n: int, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sample = np.asarray(Image.open(BUNDLED / "digits_sample.png"), np.uint8).reshape(1, 8, 8, 1)
    out = [sample]
    for _ in range(n - 1):
        # the sample with noise: real-looking digits whose answers differ a little from frame to frame
        noisy = np.clip(sample.astype(np.int16) + rng.integers(-60, 60, sample.shape), 0, 255).astype(np.uint8)
        out.append(noisy)
    return out


def _single(model: Model, x: np.ndarray) -> np.ndarray:
    model.set_batch(1)
    model.set_input(x)
    model.invoke()
    return model.dequantized(0).copy()


def test_batch_model_rows_match_single_invokes():
    m = Model(BATCH_MODEL)
    assert m.batch_refusal(8) is None and m.batch == 1
    frames = _frames(8)
    ref = [_single(m, x) for x in frames]
    m.set_batch(8)
    view = m.input_view()
    assert view.shape == (8, 8, 8, 1)
    for i, x in enumerate(frames):
        view[i : i + 1] = x
    del view
    m.invoke()
    labels = {i: str(i) for i in range(10)}
    for i in range(8):
        row = RowView(m, i)
        got = row.dequantized(0)
        assert got.shape == (1, 10)
        # XNNPACK may take another kernel for N rows: within one output quantization step (1/256)
        assert np.max(np.abs(got - ref[i])) <= 1 / 256 + 1e-6, (i, got, ref[i])
        assert np.argmax(got) == np.argmax(ref[i])
    assert postprocess.classify(RowView(m, 0), labels, 1)["classes"][0]["label"] == "7"


def test_fixed_batch_and_stateful_models_refuse_batching():
    why = Model(str(BUNDLED / "digits.tflite")).batch_refusal(4)
    assert why is not None and "fixed" in why
    stateful = Model(str(DATA / "stateful.tflite"))
    stateful.warm_up()
    assert "state" in (stateful.batch_refusal(4) or "")
    # refusing leaves the model serving one frame per invoke
    m = Model(str(BUNDLED / "digits.tflite"))
    m.batch_refusal(4)
    assert m.batch == 1 and m.input_view().shape == (1, 8, 8, 1)


def _png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x.reshape(8, 8), "L").save(buf, "PNG")
    return buf.getvalue()


def test_daemon_batches_a_burst_in_a_sandboxed_worker_and_answers_each_frame_as_alone(daemon_factory,
                                                                                     client_factory):
    d = daemon_factory({"model": {"path": BATCH_MODEL, "batch_max": 8, "batch_wait_ms": 5, "top_k": 10}})
    w = d.status()["workers"][0]
    assert w["batch_max"] == 8 and w["sandboxed"] is True
    assert Path(f"/proc/{w['pid']}/status").read_text().count("Seccomp:\t2") == 1
    c = client_factory(d.prefix)
    frames = _frames(240, seed=11)
    ref_model = Model(BATCH_MODEL)
    ids, expect, bad = [], {}, set()
    for i, x in enumerate(frames):
        fid = f"b{i}"
        ids.append(fid)
        if i % 40 == 17:
            c.send(b"\x89PNG\r\n\x1a\n garbage", fid)  # a bad frame inside a batch
            bad.add(fid)
            continue
        c.send(_png(x) if i % 2 else x.tobytes(), fid)
        expect[fid] = _single(ref_model, x).reshape(-1)
    got = c.wait(ids, 60)
    missing = [k for k, v in got.items() if v is None]
    assert not missing, missing[:5]
    for fid in bad:
        assert got[fid]["error"]["code"] == "bad_payload", got[fid]
    for fid, ref in expect.items():
        r = got[fid]
        assert "error" not in r, r
        scores = np.zeros(10, np.float32)
        for cl in r["classes"]:
            scores[cl["id"]] = cl["score"]
        assert np.max(np.abs(scores - ref)) <= 1 / 256 + 1e-3, (fid, scores, ref)
    st = d.status()
    assert st["workers"][0]["batched"] > 0, st["workers"][0]  # frames really shared invokes
    assert st["workers"][0]["restarts"] == 0
    table = subprocess.run(edged_cmd("status", "-c", str(d.cfg_path)), capture_output=True, text=True, timeout=30)
    assert table.returncode == 0 and "batch 8 (" in table.stdout, table.stdout


def test_batch_max_on_fixed_batch_model_is_logged_and_serves_one_by_one(daemon_factory, client_factory):
    d = daemon_factory({"model": {"batch_max": 4}})
    assert d.status()["workers"][0]["batch_max"] == 1
    log = d.log()
    assert "batching off" in log and "fixed" in log
    c = client_factory(d.prefix)
    c.send((BUNDLED / "digits_sample.png").read_bytes(), "one")
    r = c.wait(["one"], 20)["one"]
    assert r and r["classes"][0]["label"] == "7"
    # the supervisor counts a result (batched or not) before it publishes it: with the answer here, the count is in
    assert d.status()["workers"][0]["served"] >= 1 and d.status()["workers"][0]["batched"] == 0
