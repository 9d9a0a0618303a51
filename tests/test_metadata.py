"""Float inputs normalized with the mean and std of the model's TFLite metadata (INTERFACE.md: Frames).

The fixtures are tests/data/digits_float.tflite (expects (pixel - 127.5) / 127.5) and
tests/data/digits_nchw_float.tflite with metadata added by tests/tflite_metadata.py.
"""
from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import BUNDLED, ROOT, edged_cmd
from edged import modelfile, preprocess, runtime
from tflite_metadata import metadata_blob, with_metadata, with_normalization

DATA = ROOT / "tests" / "data"
FLOAT = DATA / "digits_float.tflite"
SAMPLE = (BUNDLED / "digits_sample.png").read_bytes()


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _probabilities(path: Path, x: np.ndarray) -> np.ndarray:
    m = runtime.Model(str(path))
    m.set_input(x)
    m.invoke()
    return m.dequantized(0).copy()


def test_input_normalization_models_without_metadata_give_none(tmp_path):
    assert modelfile.input_normalization(str(FLOAT)) is None
    assert modelfile.input_normalization(str(BUNDLED / "digits.tflite")) is None
    assert modelfile.input_normalization(str(_write(tmp_path, "junk.tflite", b"\x10\0\0\0TFL3" + b"\xff" * 8))) is None
    assert modelfile.input_normalization(str(tmp_path / "absent.tflite")) is None


@pytest.mark.parametrize(
    ("mean", "std"), [([127.5], [127.5]), ([0.0], [255.0]), ([123.7, 116.3, 103.5], [58.4, 57.1, 57.4])]
)
def test_input_normalization_reads_written_metadata_and_model_still_runs_the_same(tmp_path, mean, std):
    path = _write(tmp_path, "m.tflite", with_normalization(FLOAT.read_bytes(), mean, std))
    got = modelfile.input_normalization(str(path))
    assert got is not None
    assert np.allclose(got[0], mean) and np.allclose(got[1], std), got
    modelfile.check_structure(str(path), "m")  # the tflite-runtime guard accepts the rewritten file
    x = np.random.default_rng(3).uniform(-1, 1, (1, 8, 8, 1)).astype(np.float32)
    assert np.array_equal(_probabilities(path, x), _probabilities(FLOAT, x))


def test_input_normalization_damaged_or_unusable_metadata_gives_none(tmp_path):
    blob = metadata_blob([127.5], [127.5])
    truncated = _write(tmp_path, "t.tflite", with_metadata(FLOAT.read_bytes(), blob[:12]))
    assert modelfile.input_normalization(str(truncated)) is None
    zero_std = _write(tmp_path, "z.tflite", with_normalization(FLOAT.read_bytes(), [0.0], [0.0]))
    assert modelfile.input_normalization(str(zero_std)) is None
    nan = _write(tmp_path, "n.tflite", with_normalization(FLOAT.read_bytes(), [float("nan")], [1.0]))
    assert modelfile.input_normalization(str(nan)) is None
    other = _write(tmp_path, "o.tflite", with_metadata(FLOAT.read_bytes(), blob, name="SOMETHING_ELSE"))
    assert modelfile.input_normalization(str(other)) is None


def _info(shape: tuple[int, ...]) -> runtime.TensorInfo:
    return runtime.TensorInfo(0, "in", shape, "float32", 0.0, 0)


def test_model_normalization_reads_the_file_for_float_inputs_only(tmp_path):
    meta = _write(tmp_path, "m.tflite", with_normalization(FLOAT.read_bytes(), [0.0], [255.0]))
    f32 = runtime.TensorInfo(0, "in", (1, 8, 8, 1), "float32", 0.0, 0)
    u8 = runtime.TensorInfo(0, "in", (1, 8, 8, 1), "uint8", 1 / 255, 0)
    assert preprocess.model_normalization(str(meta), f32, 1.0, 2.0) == (0.0, 255.0, "model metadata")
    assert preprocess.model_normalization(str(FLOAT), f32, 1.0, 2.0) == (1.0, 2.0, "config")
    assert preprocess.model_normalization(str(meta), u8, 1.0, 2.0) == (1.0, 2.0, "config")


def test_normalization_prefers_metadata_checks_channel_count():
    nhwc3 = _info((1, 4, 4, 3))
    assert preprocess.normalization(nhwc3, None, 1.0, 2.0) == (1.0, 2.0, "config")
    assert preprocess.normalization(nhwc3, ((5.0,), (6.0,)), 1.0, 2.0) == (5.0, 6.0, "model metadata")
    assert preprocess.normalization(nhwc3, ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0)), 0.0, 1.0) == \
        ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0), "model metadata")
    mean, std, why = preprocess.normalization(_info((1, 4, 4, 1)), ((1.0, 2.0, 3.0), (4.0, 5.0, 6.0)), 0.0, 1.0)
    assert (mean, std) == (0.0, 1.0) and why.startswith("config") and "3 means" in why, why


@pytest.mark.parametrize("shape", [(1, 2, 2, 3), (1, 3, 2, 2)])
def test_preprocessor_per_channel_mean_and_std_on_the_channel_axis(shape):
    info = _info(shape)
    pre = preprocess.Preprocessor(info, (10.0, 20.0, 30.0), (1.0, 2.0, 4.0))
    pixels = np.full((2, 2, 3), 50, np.uint8)  # HWC, as decode() gives
    dst = np.zeros(shape, np.float32)
    pre.quantize(dst, pixels)
    per_channel = dst[0, 0, 0, :] if shape[3] == 3 else dst[0, :, 0, 0]
    assert per_channel.tolist() == [40.0, 15.0, 5.0]


def _check(tmp_path: Path, model: Path, mean: float, std: float) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / f"check-{model.stem}.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": str(model), "labels": str(BUNDLED / "digits_labels.txt"),
                                             "mean": mean, "std": std}}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run(edged_cmd("check", "-c", str(cfg)), check=False, capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)


def test_check_prints_where_the_normalization_comes_from(tmp_path):
    meta = _write(tmp_path, "digits_meta.tflite", with_normalization(FLOAT.read_bytes(), [127.5], [127.5]))
    r = _check(tmp_path, meta, 0.0, 1.0)
    assert r.returncode == 0, r.stderr
    assert "normalize    (pixel - 127.5) / 127.5, from model metadata" in r.stdout, r.stdout
    r = _check(tmp_path, FLOAT, 0.0, 1.0)
    assert r.returncode == 0, r.stderr
    assert "normalize    (pixel - 0.0) / 1.0, from config" in r.stdout, r.stdout


def test_run_float_model_metadata_overrides_config_normalization(tmp_path, daemon_factory, client_factory):
    """Config says mean 0, std 1000 (wrong for this model); the metadata's 127.5/127.5 wins and the answer is right."""
    meta = _write(tmp_path, "digits_meta.tflite", with_normalization(FLOAT.read_bytes(), [127.5], [127.5]))
    results = {}
    for name, path in (("meta", meta), ("plain", FLOAT)):
        d = daemon_factory({"model": {"path": str(path), "labels": str(BUNDLED / "digits_labels.txt"),
                                      "mean": 0.0, "std": 1000.0, "top_k": 10}})
        c = client_factory(d.prefix)
        c.send(SAMPLE, name)
        results[name] = c.wait([name], 20)[name]
        assert results[name] and "error" not in results[name], results[name]
        d.stop()
    # the right answer: the sample through the model with (pixel - 127.5) / 127.5
    pixels = np.asarray(Image.open(io.BytesIO(SAMPLE)).convert("L"), np.float32).reshape(1, 8, 8, 1)
    want = _probabilities(FLOAT, (pixels - 127.5) / 127.5)[0]
    got = {c["id"]: c["score"] for c in results["meta"]["classes"]}
    assert results["meta"]["classes"][0]["label"] == "7"
    assert all(abs(got[i] - float(want[i])) < 1e-3 for i in range(10)), (got, want)
    # without metadata the config's normalization applies, and this one is wrong enough to change the class
    assert results["plain"]["classes"][0]["label"] != "7", results["plain"]["classes"][:2]
