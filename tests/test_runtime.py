"""edged.runtime and edged.accel with real models: signatures as MANIFEST.md records them, the
digits models end to end (preprocess -> invoke -> classify) for every input type, state reset,
load errors, and the accelerator choice with its reasons."""
from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import BUNDLED, DATA, shared
from edged import accel, config, postprocess
from edged.errors import ModelError
from edged.preprocess import Preprocessor
from edged.runtime import Model, needs_edgetpu

SAMPLE = BUNDLED / "digits_sample.png"
SAMPLE_CLASS = 7  # edged/models/MODEL.md


def manifest_signature(model_file: str) -> dict:
    text = shared("MANIFEST.md").read_text()
    block = re.search(r"<!-- verify-spec:begin -->\s*```json\n(.*?)```", text, re.S)
    assert block, "MANIFEST.md has no verify-spec block"
    spec = json.loads(block.group(1))
    return next(c["signature"] for c in spec["cases"] if c["model"] == model_file and "signature" in c)


# -- signatures ------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_file", ["mobilenet_v2_1.0_224_quant.tflite", "mobilenet_v1_0.25_128_quant.tflite",
                                        "coco_ssd_mobilenet_v1_1.0_quant_2018_06_29_detect.tflite"])
def test_model_shared_model_describe_matches_manifest(model_file):
    sig = manifest_signature(model_file)
    path = str(shared(model_file))
    model = Model(path)
    d = model.describe()
    (want_in,) = sig["inputs"]
    assert d["path"] == path and d["backend"] in ("litert", "tflite-runtime") and d["stateful"] is False
    assert d["input"] == {"shape": want_in["shape"], "dtype": want_in["dtype"]}
    assert model.input.name == want_in["name"]
    assert (model.input.scale, model.input.zero_point) == pytest.approx(tuple(want_in["quant"]))
    assert model.input.nbytes == int(np.prod(want_in["shape"]))
    assert len(d["outputs"]) == len(sig["outputs"])
    for got, want in zip(d["outputs"], sig["outputs"], strict=False):
        assert (got["name"], got["shape"], got["dtype"]) == (want["name"], want["shape"], want["dtype"])
        if want["quant"][0] == 0.0:
            assert got["quantization"] is None
        else:
            assert got["quantization"] == pytest.approx(want["quant"])
    json.dumps(d, allow_nan=False)


@pytest.mark.parametrize("path, in_shape, in_dtype, in_quant, out_shape, out_dtype, out_quant", [
    (BUNDLED / "digits.tflite", [1, 8, 8, 1], "uint8", (1 / 255, 0), [1, 10], "uint8", [1 / 256, 0]),
    (DATA / "digits_int8io.tflite", [1, 8, 8, 1], "int8", (1 / 255, -128), [1, 10], "int8", [1 / 256, -128]),
    (DATA / "digits_float.tflite", [1, 8, 8, 1], "float32", None, [1, 10], "float32", None),
    (DATA / "digits_nchw_float.tflite", [1, 1, 8, 8], "float32", None, [1, 10], "float32", None),
    (DATA / "stateful.tflite", [1, 4], "float32", None, [1, 4], "float32", None),
])
def test_model_fixture_describe_matches_readme(path, in_shape, in_dtype, in_quant, out_shape, out_dtype, out_quant):
    model = Model(str(path))
    d = model.describe()
    assert d["input"] == {"shape": in_shape, "dtype": in_dtype}
    if in_quant is None:
        assert model.input.scale == 0.0
    else:
        assert (model.input.scale, model.input.zero_point) == pytest.approx(in_quant, rel=1e-6)
    (out,) = d["outputs"]
    assert (out["shape"], out["dtype"]) == (out_shape, out_dtype)
    assert out["quantization"] == (None if out_quant is None else pytest.approx(out_quant))


# -- digits end to end ----------------------------------------------------------------------------

DIGITS = [BUNDLED / "digits.tflite", DATA / "digits_int8io.tflite", DATA / "digits_float.tflite",
          DATA / "digits_nchw_float.tflite"]


@pytest.mark.parametrize("path", DIGITS, ids=lambda p: p.name)
def test_pipeline_digits_model_sample_png_classified_as_7(path):
    model = Model(str(path))
    labels = postprocess.load_labels(str(BUNDLED / "digits_labels.txt"))
    view = model.input_view()
    kind = Preprocessor(model.input).fill(view, memoryview(SAMPLE.read_bytes()))
    del view  # the interpreter refuses to run while a view of its tensors is alive
    model.invoke()
    result = postprocess.classify(model, labels, top_k=3)
    top = result["classes"][0]
    assert kind == "png"
    assert (top["id"], top["label"]) == (SAMPLE_CLASS, str(SAMPLE_CLASS)) and top["score"] > 0.9, result
    scores = [c["score"] for c in result["classes"]]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)


def test_model_int8io_quantization_both_ways():
    """In: pixel - 128 reaches the int8 tensor; out: int8 q dequantizes to (q + 128) / 256."""
    model = Model(str(DATA / "digits_int8io.tflite"))
    dst = np.zeros(model.input.shape, np.int8)
    Preprocessor(model.input).fill(dst, memoryview(SAMPLE.read_bytes()))
    model.set_input(dst)
    model.invoke()
    q = model.output(0)
    assert q.dtype == np.int8 and int(np.argmax(q)) == SAMPLE_CLASS
    np.testing.assert_allclose(model.dequantized(0), (q.astype(np.float32) + 128) / 256, rtol=0, atol=1e-7)


def test_model_digits_float_and_quantized_agree_on_probabilities():
    probs = []
    for path in (BUNDLED / "digits.tflite", DATA / "digits_float.tflite"):
        model = Model(str(path))
        dst = np.zeros(model.input.shape, model.input.dtype)
        Preprocessor(model.input).fill(dst, memoryview(SAMPLE.read_bytes()))
        model.set_input(dst)
        model.invoke()
        probs.append(model.dequantized(0).reshape(-1))
    np.testing.assert_allclose(probs[0], probs[1], atol=0.02)


# -- state -------------------------------------------------------------------------------------------

STATEFUL_X = np.array([[0.5, -1.0, 0.25, 1.0]], np.float32)
STATEFUL_FIRST = [-0.192939, 0.219848, -0.056071, 0.125799]   # tests/data/README.md
STATEFUL_SECOND = [-0.259825, 0.301012, -0.116112, 0.276180]


def _run(model: Model, x: np.ndarray) -> np.ndarray:
    model.set_input(x)
    model.invoke()
    return model.output(0).copy()


def test_model_stateful_fixture_after_warm_up_repeats_output():
    model = Model(str(DATA / "stateful.tflite"))
    # untreated, the fixture carries state from one invoke to the next
    np.testing.assert_allclose(_run(model, STATEFUL_X)[0], STATEFUL_FIRST, atol=1e-5)
    np.testing.assert_allclose(_run(model, STATEFUL_X)[0], STATEFUL_SECOND, atol=1e-5)
    model.warm_up()
    assert model.stateful and model.describe()["stateful"] is True
    for _ in range(3):
        np.testing.assert_allclose(_run(model, STATEFUL_X)[0], STATEFUL_FIRST, atol=1e-5)


@pytest.mark.parametrize("path", DIGITS, ids=lambda p: p.name)
def test_model_stateless_model_after_warm_up_stays_stateless(path):
    model = Model(str(path))
    model.warm_up()
    assert model.stateful is False


# -- load errors -------------------------------------------------------------------------------------

def test_model_invoking_error_raises_modelerror_naming_op():
    with pytest.raises(ModelError, match="fake-op-double") as exc:
        Model(str(shared("model_invoking_error.tflite")))
    assert "model_invoking_error.tflite" in str(exc.value) and "\n" not in str(exc.value)


def test_model_missing_file_raises_modelerror_naming_file(tmp_path):
    missing = tmp_path / "nothere.tflite"
    with pytest.raises(ModelError, match=re.escape(str(missing))):
        Model(str(missing))


CORRUPT = {
    "tfl3_then_noise": b"\x1c\x00\x00\x00TFL3" + np.random.default_rng(3).bytes(4096),  # flatbuffer identifier
    "empty": b"",
    "text": b"not a model at all\n",
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_model_corrupt_file_raises_modelerror_naming_file(tmp_path, name):
    path = tmp_path / "corrupt.tflite"
    path.write_bytes(CORRUPT[name])
    with pytest.raises(ModelError, match="corrupt.tflite") as exc:
        Model(str(path))
    assert "\n" not in str(exc.value)


def test_model_truncated_real_model_raises_modelerror(tmp_path):
    path = tmp_path / "half.tflite"
    data = (BUNDLED / "digits.tflite").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="half.tflite"):
        Model(str(path))


# -- accelerator choice ------------------------------------------------------------------------------

def _has_edgetpu_runtime() -> bool:
    try:
        ctypes.CDLL("libedgetpu.so.1")
    except OSError:
        return False
    return True


no_coral = pytest.mark.skipif(_has_edgetpu_runtime(), reason="libedgetpu is installed: these tests assume no Edge TPU")


def accel_config(tmp_path: Path, model: Path, prefer: list[str], fallback: Path | None = None) -> config.Config:
    text = (f"model:\n  path: {model}\n  cpu_fallback: {fallback or 'null'}\n"
            f"accelerator:\n  prefer: [{', '.join(prefer)}]\n")
    return config.parse(text, str(tmp_path / "edged.yaml"), tmp_path)


@no_coral
def test_choose_edgetpu_model_without_coral_raises_modelerror(tmp_path):
    tpu = shared("mobilenet_v1_0.25_128_quant_edgetpu.tflite")
    assert needs_edgetpu(str(tpu))
    with pytest.raises(ModelError, match="Edge TPU") as exc:
        accel.choose(accel_config(tmp_path, tpu, ["coral", "gpu", "cpu"]))
    msg = str(exc.value)
    assert "cpu_fallback" in msg and "coral:" in msg and "\n" not in msg


@no_coral
def test_choose_edgetpu_model_prefer_cpu_with_fallback_loads_fallback(tmp_path):
    tpu = shared("mobilenet_v1_0.25_128_quant_edgetpu.tflite")
    cpu = shared("mobilenet_v1_0.25_128_quant.tflite")
    choice = accel.choose(accel_config(tmp_path, tpu, ["cpu"], fallback=cpu))
    assert choice.kind == "cpu"
    assert choice.model.path == str(cpu) and choice.model.input.shape == (1, 128, 128, 3)
    report = choice.report()
    assert report["chosen"] == "cpu" and report["model"] == str(cpu)
    assert any("cpu_fallback" in s["reason"] for s in report["skipped"])


@no_coral
def test_choose_edgetpu_model_prefer_cpu_without_fallback_raises_modelerror(tmp_path):
    tpu = shared("mobilenet_v1_0.25_128_quant_edgetpu.tflite")
    with pytest.raises(ModelError, match="Edge TPU"):
        accel.choose(accel_config(tmp_path, tpu, ["cpu"]))


@no_coral
def test_choose_cpu_model_prefer_all_picks_cpu_with_reasons(tmp_path):
    model = shared("mobilenet_v1_0.25_128_quant.tflite")
    assert not needs_edgetpu(str(model))
    choice = accel.choose(accel_config(tmp_path, model, ["coral", "gpu", "cpu"]))
    assert choice.kind == "cpu" and choice.model.path == str(model)
    assert [k for k, _ in choice.skipped] == ["coral", "gpu"]
    for kind, reason in choice.skipped:
        assert isinstance(reason, str) and reason.strip(), kind
    assert "libedgetpu" in dict(choice.skipped)["coral"]
    report = choice.report()
    assert report["chosen"] == "cpu" and [s["kind"] for s in report["skipped"]] == ["coral", "gpu"]
    json.dumps(report, allow_nan=False)


def test_choose_missing_model_raises_modelerror_naming_file(tmp_path):
    with pytest.raises(ModelError, match="nothere.tflite"):
        accel.choose(accel_config(tmp_path, tmp_path / "nothere.tflite", ["cpu"]))
