#!/usr/bin/env python3
"""Build edged's bundled TFLite models and the TFLite test fixtures.

How to run (from the repository root):

    python3 -m venv .venv-model
    .venv-model/bin/pip install tensorflow-cpu scikit-learn pillow
    .venv-model/bin/python tools/build_model.py

(`make model` runs the last line.)

What it writes:

    edged/models/digits.tflite        full-integer CNN, uint8 in [1,8,8,1] / uint8 out [1,10]
    edged/models/digits_labels.txt    "0".."9", line i = class i
    edged/models/digits_sample.png    one held-out 8x8 greyscale digit, correctly classified
    edged/models/MODEL.md             description, signature, accuracy, rebuild command
    edged/models/__init__.py          empty
    tests/data/digits_int8io.tflite   same network, int8 in / int8 out
    tests/data/digits_float.tflite    same network, float32, input (p-127.5)/127.5, NHWC
    tests/data/digits_nchw_float.tflite  same, float32 NCHW input [1,1,8,8]
    tests/data/stateful.tflite        tiny LSTM whose state lives in TFLite variable tensors
    tests/data/README.md              what each fixture is and how it was built

The network is a small Keras CNN trained on scikit-learn's load_digits()
(no download needed: the data set ships inside scikit-learn).  Pixels are
value*255/16 rounded to uint8 (white ink on black background); the network is
trained on pixel/255.

At the end the script checks the outputs with the ai_edge_litert runtime in
the daemon's venv (.venv/bin/python by default, see --litert-python).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Determinism knobs: must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")

import warnings

warnings.filterwarnings("ignore")

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import tensorflow as tf
import keras

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "edged" / "models"
TESTDATA_DIR = REPO / "tests" / "data"
BUILD_CMD = ".venv-model/bin/python tools/build_model.py"

SEED = 1234
TEST_SIZE = 0.25
EPOCHS = 40
BATCH = 32
SAMPLE_DIGIT = 7
MIN_ACCURACY = 0.95
MAX_FILE_BYTES = 200 * 1024

# stateful fixture
ST_IN, ST_UNITS = 4, 4
ST_PROBE = [[0.5, -1.0, 0.25, 1.0]]


def log(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------
# data + training
# --------------------------------------------------------------------------


def load_data():
    digits = load_digits()
    # 0..16 -> 0..255, white ink on black background, NHWC with one channel.
    pixels = np.round(digits.images * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    pixels = pixels[..., np.newaxis]
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        pixels, labels, test_size=TEST_SIZE, stratify=labels, random_state=SEED
    )
    return x_tr, x_te, y_tr, y_te


def build_network() -> keras.Model:
    inp = keras.Input(shape=(8, 8, 1), name="pixels01")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inp)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(0.25, seed=SEED, name="dropout")(x)
    x = keras.layers.Dense(32, activation="relu", name="dense")(x)
    x = keras.layers.Dense(10, name="logits")(x)
    out = keras.layers.Softmax(name="softmax")(x)
    return keras.Model(inp, out, name="digits_cnn")


def train(x_tr: np.ndarray, y_tr: np.ndarray) -> keras.Model:
    keras.utils.set_random_seed(SEED)
    model = build_network()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(
        x_tr.astype(np.float32) / 255.0,
        y_tr,
        epochs=EPOCHS,
        batch_size=BATCH,
        shuffle=True,
        verbose=0,
    )
    return model


# --------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------


# Serving functions around the trained network; each becomes the batch-1
# `serving_default` signature of its own SavedModel (Keras ExportArchive).
def serve_unit(net):
    """x: float pixel/255 in 0..1, NHWC [1,8,8,1]."""

    def fn(x):
        return {"probabilities": net(x, training=False)}

    return fn, tf.TensorSpec([1, 8, 8, 1], tf.float32, name="input")


def serve_unit_batch(net):
    """Like serve_unit, with a free batch dimension: x [N,8,8,1] (shape signature [-1,8,8,1])."""

    def fn(x):
        return {"probabilities": net(x, training=False)}

    return fn, tf.TensorSpec([None, 8, 8, 1], tf.float32, name="input")


def serve_symmetric(net):
    """x: float (pixel-127.5)/127.5 in -1..1, NHWC [1,8,8,1]; (x+1)/2 == pixel/255."""

    def fn(x):
        return {"probabilities": net((x + 1.0) * 0.5, training=False)}

    return fn, tf.TensorSpec([1, 8, 8, 1], tf.float32, name="input")


def serve_symmetric_nchw(net):
    """x: float (pixel-127.5)/127.5, NCHW [1,1,8,8]."""

    def fn(x):
        nhwc = tf.transpose(x, [0, 2, 3, 1])
        return {"probabilities": net((nhwc + 1.0) * 0.5, training=False)}

    return fn, tf.TensorSpec([1, 1, 8, 8], tf.float32, name="input")


def convert(net: keras.Model, serving, workdir: Path, name: str, *, quant_io=None, rep_images=None) -> bytes:
    """Export `serving` as the batch-1 serving_default signature of a SavedModel and convert it.

    (Keras' ExportArchive is used because a Keras 3 model saved inside a plain
    tf.Module keeps its weights as resource variables in the .tflite.)
    """
    fn, spec = serving(net)
    sm_dir = workdir / name
    archive = keras.export.ExportArchive()
    archive.track(net)
    archive.add_endpoint("serving_default", fn, input_signature=[spec])
    archive.write_out(str(sm_dir), verbose=False)
    conv = tf.lite.TFLiteConverter.from_saved_model(str(sm_dir))
    if quant_io is not None:
        rep = rep_images.astype(np.float32) / 255.0

        def representative_dataset():
            for i in range(len(rep)):
                yield [rep[i : i + 1]]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = representative_dataset
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = quant_io
        conv.inference_output_type = quant_io
    return conv.convert()


def build_stateful(workdir: Path) -> tuple[bytes, np.ndarray]:
    """Tiny 1-step LSTM whose (h, c) state is kept in TFLite variable tensors.

    The tf.function below carries the same "api_implements": "lstm_*" attribute
    that Keras 2's LSTM layer uses; the TFLite converter (SavedModel import
    path) replaces it with a fused UNIDIRECTIONAL_SEQUENCE_LSTM op, whose
    activation and cell state operands are variable tensors: each invoke
    starts from the state the previous one left behind, and
    Interpreter.reset_all_variables() zeroes them again.
    """
    rng = np.random.default_rng(SEED)
    kernel = tf.constant(rng.normal(0.0, 0.6, (ST_IN, 4 * ST_UNITS)).astype(np.float32))
    rkernel = tf.constant(rng.normal(0.0, 0.6, (ST_UNITS, 4 * ST_UNITS)).astype(np.float32))
    bias = tf.constant(rng.normal(0.0, 0.1, (4 * ST_UNITS,)).astype(np.float32))

    @tf.function(
        autograph=False,
        experimental_attributes={
            "api_implements": "lstm_edged_stateful_fixture",
            "api_preferred_device": "CPU",
            "time_major": False,
            "go_backwards": False,
        },
    )
    def lstm(inputs, init_h, init_c, k, rk, b):
        # Keras gate order i, f, c, o.  Only used for the TF-side reference.
        h, c = init_h, init_c
        outs = []
        for t in range(inputs.shape[1]):
            z = tf.matmul(inputs[:, t, :], k) + tf.matmul(h, rk) + b
            zi, zf, zc, zo = tf.split(z, 4, axis=1)
            c = tf.sigmoid(zf) * c + tf.sigmoid(zi) * tf.tanh(zc)
            h = tf.sigmoid(zo) * tf.tanh(c)
            outs.append(h)
        return h, tf.stack(outs, axis=1), h, c, tf.constant(1.0)

    class Stateful(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, ST_IN], tf.float32, name="x")])
        def serve(self, x):
            zero = tf.zeros([1, ST_UNITS])
            _, seq, _, _, _ = lstm(tf.reshape(x, [1, 1, ST_IN]), zero, zero, kernel, rkernel, bias)
            return {"y": seq[:, -1, :]}

    mod = Stateful()
    sm_dir = workdir / "stateful"
    tf.saved_model.save(mod, str(sm_dir), signatures={"serving_default": mod.serve})
    tflite = tf.lite.TFLiteConverter.from_saved_model(str(sm_dir)).convert()
    # The first invoke from zero state equals the plain TF computation.
    ref = mod.serve(tf.constant(ST_PROBE, tf.float32))["y"].numpy()
    return tflite, ref


# --------------------------------------------------------------------------
# inspection / evaluation with tf.lite.Interpreter
# --------------------------------------------------------------------------


def interpreter(content: bytes) -> tf.lite.Interpreter:
    it = tf.lite.Interpreter(model_content=content, num_threads=1)
    it.allocate_tensors()
    return it


def describe(content: bytes) -> dict:
    it = interpreter(content)

    def td(d):
        scale, zp = d["quantization"]
        return {
            "name": d["name"],
            "shape": [int(v) for v in d["shape"]],
            "dtype": np.dtype(d["dtype"]).name,
            "scale": float(scale),
            "zero_point": int(zp),
        }

    from tensorflow.lite.python import schema_py_generated as fb

    model = fb.ModelT.InitFromPackedBuf(content, 0)
    code_names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    ops = []
    for oc in model.operatorCodes:
        code = max(oc.builtinCode, oc.deprecatedBuiltinCode)
        ops.append(code_names.get(code, str(code)))
    variables = [
        t.name.decode() if isinstance(t.name, bytes) else t.name
        for sg in model.subgraphs
        for t in sg.tensors
        if t.isVariable
    ]
    sig = it.get_signature_list()
    return {
        "inputs": [td(d) for d in it.get_input_details()],
        "outputs": [td(d) for d in it.get_output_details()],
        "ops": sorted(set(ops)),
        "variable_tensors": variables,
        "signatures": sig,
        "bytes": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
    }


def quantize_pixels(pixels: np.ndarray, inp: dict) -> np.ndarray:
    """uint8 pixels -> the model's input tensor (float 0..1 mapped by scale/zp)."""
    dtype = np.dtype(inp["dtype"])
    if dtype == np.uint8 and abs(inp["scale"] - 1 / 255) < 1e-6 and inp["zero_point"] == 0:
        return pixels.astype(np.uint8)
    real = pixels.astype(np.float32) / 255.0
    info = np.iinfo(dtype)
    q = np.round(real / inp["scale"] + inp["zero_point"])
    return q.clip(info.min, info.max).astype(dtype)


def predict_all(content: bytes, images: np.ndarray, mode: str) -> np.ndarray:
    """Run every image through the model; return dequantized probabilities [N,10]."""
    it = interpreter(content)
    inp = it.get_input_details()[0]
    out = it.get_output_details()[0]
    inp_d = {"dtype": inp["dtype"], "scale": inp["quantization"][0], "zero_point": inp["quantization"][1]}
    o_scale, o_zp = out["quantization"]
    probs = []
    for img in images:
        if mode == "quant":
            x = quantize_pixels(img[np.newaxis], inp_d)
        elif mode == "float_nhwc":
            x = ((img.astype(np.float32) - 127.5) / 127.5)[np.newaxis]
        elif mode == "float_nchw":
            x = ((img.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[np.newaxis]
        else:
            raise ValueError(mode)
        it.set_tensor(inp["index"], x)
        it.invoke()
        y = it.get_tensor(out["index"])[0]
        if o_scale:
            y = (y.astype(np.float32) - o_zp) * o_scale
        probs.append(y.astype(np.float32))
    return np.stack(probs)


def check_stateful(content: bytes, ref: np.ndarray) -> dict:
    it = interpreter(content)
    inp = it.get_input_details()[0]
    out = it.get_output_details()[0]
    x = np.array(ST_PROBE, np.float32)

    def run():
        it.set_tensor(inp["index"], x)
        it.invoke()
        return it.get_tensor(out["index"]).copy()

    first, second, third = run(), run(), run()
    it.reset_all_variables()
    after_reset = run()
    fresh = interpreter(content)
    fresh.set_tensor(inp["index"], x)
    fresh.invoke()
    recreated = fresh.get_tensor(out["index"]).copy()
    res = {
        "first": first[0].tolist(),
        "second": second[0].tolist(),
        "third": third[0].tolist(),
        "after_reset": after_reset[0].tolist(),
        "recreated": recreated[0].tolist(),
        "tf_reference": ref[0].tolist(),
    }
    assert not np.allclose(first, second, atol=1e-4), "stateful: two invokes gave the same output"
    assert np.allclose(first, after_reset, atol=1e-6), "stateful: reset_all_variables() did not reset"
    assert np.allclose(first, recreated, atol=1e-6), "stateful: a fresh interpreter differs"
    assert np.allclose(first, ref, atol=1e-5), "stateful: first invoke differs from the TF reference"
    return res


# --------------------------------------------------------------------------
# check with ai_edge_litert in the daemon's venv
# --------------------------------------------------------------------------

LITERT_CHECK = r"""
import json, sys
import numpy as np
from PIL import Image
from ai_edge_litert.interpreter import Interpreter

models, testdata, probe = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
res = {}
pix = np.asarray(Image.open(models + "/digits_sample.png").convert("L"), dtype=np.uint8)
labels = open(models + "/digits_labels.txt").read().split()

def run(path, x):
    it = Interpreter(model_path=path)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    it.set_tensor(i["index"], x)
    it.invoke()
    return it.get_tensor(o["index"])[0]

y = run(models + "/digits.tflite", pix.reshape(1, 8, 8, 1))
res["digits"] = {"argmax": int(np.argmax(y)), "label": labels[int(np.argmax(y))], "raw": y.tolist()}
y = run(testdata + "/digits_int8io.tflite", (pix.astype(np.int16) - 128).astype(np.int8).reshape(1, 8, 8, 1))
res["digits_int8io"] = {"argmax": int(np.argmax(y))}
f = ((pix.astype(np.float32) - 127.5) / 127.5)
res["digits_float"] = {"argmax": int(np.argmax(run(testdata + "/digits_float.tflite", f.reshape(1, 8, 8, 1))))}
res["digits_nchw_float"] = {"argmax": int(np.argmax(run(testdata + "/digits_nchw_float.tflite", f.reshape(1, 1, 8, 8))))}

it = Interpreter(model_path=testdata + "/stateful.tflite")
it.allocate_tensors()
i, o = it.get_input_details()[0], it.get_output_details()[0]
x = np.array(probe, np.float32)
def step():
    it.set_tensor(i["index"], x)
    it.invoke()
    return it.get_tensor(o["index"])[0].tolist()
st = {"first": step(), "second": step()}
try:
    it.reset_all_variables()
    st["reset_all_variables"] = "ok"
    st["after_reset"] = step()
except Exception as e:  # noqa: BLE001
    st["reset_all_variables"] = "error: %r" % (e,)
it2 = Interpreter(model_path=testdata + "/stateful.tflite")
it2.allocate_tensors()
it2.set_tensor(it2.get_input_details()[0]["index"], x)
it2.invoke()
st["recreated"] = it2.get_tensor(it2.get_output_details()[0]["index"])[0].tolist()
res["stateful"] = st
import ai_edge_litert
res["version"] = getattr(ai_edge_litert, "__version__", "unknown")
print("LITERT_RESULT " + json.dumps(res))
"""


def litert_python_ready(py: Path) -> bool:
    if not py.exists():
        return False
    r = subprocess.run(
        [str(py), "-c", "import numpy, PIL, ai_edge_litert.interpreter"],
        capture_output=True,
        text=True,
    )
    return r.returncode == 0


def check_with_litert(py: Path, wait_s: int) -> dict | None:
    deadline = time.monotonic() + wait_s
    while not litert_python_ready(py):
        if time.monotonic() >= deadline:
            return None
        log(f"  {py} cannot import ai_edge_litert yet; retrying in 15 s")
        time.sleep(15)
    r = subprocess.run(
        [str(py), "-c", LITERT_CHECK, str(MODELS_DIR), str(TESTDATA_DIR), json.dumps(ST_PROBE)],
        capture_output=True,
        text=True,
    )
    for line in r.stdout.splitlines():
        if line.startswith("LITERT_RESULT "):
            return json.loads(line[len("LITERT_RESULT ") :])
    raise RuntimeError(f"ai_edge_litert check failed (rc={r.returncode}):\n{r.stdout}\n{r.stderr}")


# --------------------------------------------------------------------------
# docs
# --------------------------------------------------------------------------


def fmt_tensor(t: dict) -> str:
    q = (
        f"scale={t['scale']:.9g}, zero_point={t['zero_point']}"
        if t["scale"]
        else "not quantized"
    )
    return f"`{t['name']}` shape {t['shape']} {t['dtype']} ({q})"


def sig_keys(d: dict) -> str:
    s = d["signatures"].get("serving_default", {})
    return f"signature `serving_default`: inputs {s.get('inputs')}, outputs {s.get('outputs')}"


def vec(v) -> str:
    return "[" + ", ".join(f"{x:.6f}" for x in v) + "]"


def write_model_md(info: dict) -> None:
    d = info["desc"]["digits"]
    i, o = d["inputs"][0], d["outputs"][0]
    text = f"""\
# Bundled model: `digits.tflite`

Generated by `tools/build_model.py`; do not edit by hand. Rebuild with

```
{BUILD_CMD}
```

(from the repository root, with the builder venv made by
`python3 -m venv .venv-model && .venv-model/bin/pip install tensorflow-cpu scikit-learn pillow`;
`make model` runs the same command).

## What it is

A small convolutional digit classifier (0-9), full-integer quantized TFLite.
Trained with TensorFlow {tf.__version__} / Keras {keras.__version__} on
scikit-learn's `load_digits()` data set: 1797 greyscale 8x8 images whose
values 0..16 are scaled to pixels `round(v*255/16)` in 0..255 (white ink on a
black background). Network: Conv2D(16,3x3,relu) -> Conv2D(32,3x3,relu) ->
MaxPool 2x2 -> Flatten -> Dropout 0.25 -> Dense(32,relu) -> Dense(10) ->
Softmax, trained on pixel/255 for {EPOCHS} epochs (Adam, batch {BATCH},
seed {SEED}). Converted with `TFLiteConverter` (SavedModel with a batch-1
signature), `optimizations=[DEFAULT]`, a representative data set of the
{info['n_train']} training images as float 0..1,
`supported_ops=[TFLITE_BUILTINS_INT8]`, `inference_input_type=tf.uint8`,
`inference_output_type=tf.uint8`.

## Signature

- {sig_keys(d)}
- input: {fmt_tensor(i)}. Raw uint8 pixels 0..255 in NHWC order, fed as-is:
  the input quantization (scale 1/255, zero point 0) maps them to the 0..1
  range the network was trained on.
- output: {fmt_tensor(o)}. Softmax probabilities:
  `p = (q - {o['zero_point']}) * {o['scale']:.9g}`, 0..1. Index i is the class
  on line i of `digits_labels.txt` ("0".."9").
- ops: {", ".join(d['ops'])}
- size: {d['bytes']} bytes, sha256 `{d['sha256']}`

## Accuracy

Held-out accuracy of the **quantized** model (run with `tf.lite.Interpreter`,
raw uint8 pixels in): **{info['acc']['digits']:.4f}** on {info['n_test']} test
images (25% stratified hold-out, `train_test_split(random_state={SEED})`).
Keras float model on the same images: {info['acc']['keras']:.4f}.

## Sample

`digits_sample.png` is held-out test image #{info['sample_index']} (8x8, mode
"L", pixels 0..255 as above). Expected class: **{info['sample_class']}**.
Quantized output for it (uint8): {info['sample_raw']} (argmax {info['sample_class']}).

Files: `digits.tflite`, `digits_labels.txt`, `digits_sample.png`, this file.
Test fixtures built from the same network are in `tests/data/` (see its README.md).
"""
    (MODELS_DIR / "MODEL.md").write_text(text)


def write_testdata_readme(info: dict) -> None:
    desc = info["desc"]
    st = info["stateful_tf"]
    lt = info.get("litert")

    def block(name: str) -> str:
        d = desc[name]
        return "\n".join(
            [f"- {sig_keys(d)}"]
            + [f"- input: {fmt_tensor(t)}" for t in d["inputs"]]
            + [f"- output: {fmt_tensor(t)}" for t in d["outputs"]]
            + [f"- ops: {', '.join(d['ops'])}"]
            + (
                [f"- variable tensors: {', '.join(d['variable_tensors'])}"]
                if d["variable_tensors"]
                else []
            )
            + [f"- size: {d['bytes']} bytes, sha256 `{d['sha256']}`"]
        )

    if lt is None:
        litert_text = (
            "Not checked in this build: the ai_edge_litert runtime (`.venv/bin/python`) "
            "was not available when the script ran."
        )
    else:
        ls = lt["stateful"]
        reset_ok = ls.get("reset_all_variables") == "ok" and np.allclose(
            ls.get("after_reset", [np.nan]), ls["first"], atol=1e-6
        )
        litert_text = f"""\
Checked with `ai_edge_litert` {lt["version"]} (`from ai_edge_litert.interpreter import Interpreter`):
first invoke {vec(ls["first"])}, second {vec(ls["second"])} (differs);
`reset_all_variables()`: {ls["reset_all_variables"]}{", and the next invoke reproduces the first output" if reset_ok else ", but it does NOT reproduce the first output"};
a re-created interpreter gives {vec(ls["recreated"])}."""

    text = f"""\
# TFLite test fixtures

Generated by `tools/build_model.py` (together with `edged/models/digits.tflite`);
do not edit by hand. Rebuild from the repository root with

```
{BUILD_CMD}
```

All digit fixtures are the **same trained network** as `edged/models/digits.tflite`
(small Keras CNN on scikit-learn `load_digits()`, trained on pixel/255, seed
{SEED}); each was saved as a SavedModel with a batch-1 `serving_default`
signature and converted with `tf.lite.TFLiteConverter.from_saved_model`
(TensorFlow {tf.__version__}). "pixel" below is the uint8 value 0..255 of
`edged/models/digits_sample.png` (expected class {info['sample_class']}), and
held-out accuracy is on the same {info['n_test']} test images as MODEL.md.

## digits_int8io.tflite

Full-integer quantization exactly like `digits.tflite` (representative data
set = training images as float 0..1, `supported_ops=[TFLITE_BUILTINS_INT8]`)
but `inference_input_type=tf.int8`, `inference_output_type=tf.int8`. Feed
`pixel - 128` as int8 (scale 1/255, zero point -128 maps it to 0..1);
probabilities are `(q + 128) / 256`.

{block('digits_int8io')}
- held-out accuracy: {info['acc']['digits_int8io']:.4f}

## digits_float.tflite

No quantization, float32 NHWC input [1,8,8,1] expecting `(pixel-127.5)/127.5`
(-1..1). The network was **not** retrained: the serving function adds a
rescaling `(x + 1) / 2` (= pixel/255) in front of the trained network.
Output: float32 softmax probabilities [1,10].

{block('digits_float')}
- held-out accuracy: {info['acc']['digits_float']:.4f}

## digits_nchw_float.tflite

Like `digits_float.tflite` but the input is NCHW float32 [1,1,8,8], same
normalisation `(pixel-127.5)/127.5`. The serving function transposes
NCHW -> NHWC (`tf.transpose(x, [0,2,3,1])`), rescales `(x+1)/2`, then runs the
trained network.

{block('digits_nchw_float')}
- held-out accuracy: {info['acc']['digits_nchw_float']:.4f}

## digits_batch.tflite

The network of `digits.tflite`, quantized the same way (uint8 in and out), but
converted from a serving function whose batch dimension is free
(`TensorSpec([None, 8, 8, 1])`): the input's shape signature is [-1,8,8,1], so
`resize_tensor_input` to [N,8,8,1] works (with XNNPACK too), which the
batch-1 models refuse. Used by the batching tests and benchmark
(`model.batch_max`).

{block('digits_batch')}
- held-out accuracy: {info['acc']['digits_batch']:.4f}

## stateful.tflite

A tiny model with state kept between invokes in TFLite **variable tensors**:
a one-time-step LSTM (4 inputs, 4 units, fixed random weights from
`numpy.random.default_rng({SEED})`), input `x` float32 [1,4], output `y` float32 [1,4].

Mechanism: the LSTM is written as a `tf.function` carrying the
`api_implements="lstm_..."` attribute that Keras 2's LSTM layer uses, with
zero initial state. The converter (SavedModel import path) fuses it into one
`UNIDIRECTIONAL_SEQUENCE_LSTM` op whose activation state and cell state
operands become variable tensors (`is_variable`): every invoke starts from the
state the previous invoke left, and `Interpreter.reset_all_variables()` sets
them back to zero. There are no VAR_HANDLE / READ_VARIABLE / ASSIGN_VARIABLE
ops. (Observed while writing the builder, TF 2.21 / ai_edge_litert 2.3: a
`tf.Variable` accumulator in a `tf.Module` converts to VAR_HANDLE /
READ_VARIABLE / ASSIGN_VARIABLE resource variables instead, and
`reset_all_variables()` does not reset those, only a new interpreter does;
a Keras 3 `LSTM(stateful=True)` converts to a WHILE loop over resource
variables that fails at invoke. Hence the fused-LSTM mechanism here.)

{block('stateful')}

Behaviour with `tf.lite.Interpreter` (TF {tf.__version__}), input `x = {ST_PROBE}`:

- 1st invoke: {vec(st['first'])} (equals the plain TensorFlow computation from zero state)
- 2nd invoke: {vec(st['second'])}
- 3rd invoke: {vec(st['third'])}
- after `reset_all_variables()`: {vec(st['after_reset'])} (= 1st)
- a freshly created interpreter, 1st invoke: {vec(st['recreated'])} (= 1st)

{litert_text}
"""
    (TESTDATA_DIR / "README.md").write_text(text)


# --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--litert-python",
        default=str(REPO / ".venv" / "bin" / "python"),
        help="python with ai_edge_litert, numpy, pillow used for the final check (default: .venv/bin/python)",
    )
    ap.add_argument(
        "--litert-wait",
        type=int,
        default=120,
        help="seconds to keep retrying while that python cannot import ai_edge_litert (default 120)",
    )
    ap.add_argument("--skip-litert", action="store_true", help="skip the ai_edge_litert check")
    args = ap.parse_args()

    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)

    MODELS_DIR.mkdir(parents=True, exist_ok=True)
    TESTDATA_DIR.mkdir(parents=True, exist_ok=True)

    log(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, seed {SEED}")
    x_tr, x_te, y_tr, y_te = load_data()
    log(f"data: {len(x_tr)} train / {len(x_te)} held-out images")

    t0 = time.monotonic()
    net = train(x_tr, y_tr)
    keras_acc = float(np.mean(np.argmax(net.predict(x_te.astype(np.float32) / 255.0, verbose=0), 1) == y_te))
    log(f"trained in {time.monotonic() - t0:.1f} s; Keras float held-out accuracy {keras_acc:.4f}")

    models: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="edged-build-model-") as tmp:
        work = Path(tmp)
        models["digits"] = convert(net, serve_unit, work, "digits", quant_io=tf.uint8, rep_images=x_tr)
        models["digits_int8io"] = convert(net, serve_unit, work, "int8io", quant_io=tf.int8, rep_images=x_tr)
        models["digits_float"] = convert(net, serve_symmetric, work, "float")
        models["digits_nchw_float"] = convert(net, serve_symmetric_nchw, work, "nchw")
        models["digits_batch"] = convert(net, serve_unit_batch, work, "batch", quant_io=tf.uint8, rep_images=x_tr)
        models["stateful"], st_ref = build_stateful(work)

    desc = {k: describe(v) for k, v in models.items()}

    # --- signature assertions -------------------------------------------------
    di, do = desc["digits"]["inputs"][0], desc["digits"]["outputs"][0]
    assert di["shape"] == [1, 8, 8, 1] and di["dtype"] == "uint8", di
    assert abs(di["scale"] - 1.0 / 255.0) < 1e-6 and di["zero_point"] == 0, (
        f"digits input quantization must map uint8 0..255 to 0..1, got {di}"
    )
    assert do["shape"] == [1, 10] and do["dtype"] == "uint8", do
    assert (0 - do["zero_point"]) * do["scale"] >= 0 and (255 - do["zero_point"]) * do["scale"] <= 1.0 + 1e-6, do
    ii = desc["digits_int8io"]["inputs"][0]
    assert ii["shape"] == [1, 8, 8, 1] and ii["dtype"] == "int8", ii
    assert abs(ii["scale"] - 1.0 / 255.0) < 1e-6 and ii["zero_point"] == -128, ii
    assert desc["digits_int8io"]["outputs"][0]["dtype"] == "int8"
    assert desc["digits_float"]["inputs"][0]["shape"] == [1, 8, 8, 1]
    assert desc["digits_float"]["inputs"][0]["dtype"] == "float32"
    assert desc["digits_nchw_float"]["inputs"][0]["shape"] == [1, 1, 8, 8]
    assert desc["digits_nchw_float"]["inputs"][0]["dtype"] == "float32"
    assert desc["stateful"]["variable_tensors"], "stateful.tflite has no variable tensors"
    bsig = interpreter(models["digits_batch"]).get_input_details()[0]["shape_signature"]
    assert [int(v) for v in bsig] == [-1, 8, 8, 1], f"digits_batch: batch dimension not free ({bsig})"

    # --- accuracy -------------------------------------------------------------
    modes = {
        "digits": "quant",
        "digits_int8io": "quant",
        "digits_float": "float_nhwc",
        "digits_nchw_float": "float_nchw",
        "digits_batch": "quant",
    }
    probs = {k: predict_all(models[k], x_te, m) for k, m in modes.items()}
    acc = {k: float(np.mean(np.argmax(p, 1) == y_te)) for k, p in probs.items()}
    acc["keras"] = keras_acc
    for k in modes:
        log(f"held-out accuracy {k:18s} {acc[k]:.4f}")
    assert acc["digits"] >= MIN_ACCURACY, f"quantized accuracy {acc['digits']:.4f} < {MIN_ACCURACY}"

    # --- sample: first held-out SAMPLE_DIGIT that every variant gets right -----
    preds = {k: np.argmax(p, 1) for k, p in probs.items()}
    candidates = [
        i
        for i in range(len(y_te))
        if y_te[i] == SAMPLE_DIGIT and all(preds[k][i] == SAMPLE_DIGIT for k in preds)
    ]
    assert candidates, f"no held-out {SAMPLE_DIGIT} classified correctly by all variants"
    # prefer a confident one
    sample_index = max(candidates[:10], key=lambda i: probs["digits"][i][SAMPLE_DIGIT])
    sample = x_te[sample_index, :, :, 0]

    # --- write artefacts ------------------------------------------------------
    (MODELS_DIR / "digits.tflite").write_bytes(models["digits"])
    (MODELS_DIR / "digits_labels.txt").write_text("".join(f"{i}\n" for i in range(10)))
    Image.fromarray(sample, mode="L").save(MODELS_DIR / "digits_sample.png", optimize=True)
    init_py = MODELS_DIR / "__init__.py"
    init_py.write_text("")
    for k in ("digits_int8io", "digits_float", "digits_nchw_float", "digits_batch", "stateful"):
        (TESTDATA_DIR / f"{k}.tflite").write_bytes(models[k])

    # the PNG round-trips exactly and the quantized model classifies it
    back = np.asarray(Image.open(MODELS_DIR / "digits_sample.png"), dtype=np.uint8)
    assert back.shape == (8, 8) and np.array_equal(back, sample), "sample PNG does not round-trip"
    it = interpreter(models["digits"])
    it.set_tensor(it.get_input_details()[0]["index"], back.reshape(1, 8, 8, 1))
    it.invoke()
    sample_raw = it.get_tensor(it.get_output_details()[0]["index"])[0]
    assert int(np.argmax(sample_raw)) == SAMPLE_DIGIT
    log(f"sample: held-out image #{sample_index}, class {SAMPLE_DIGIT}, uint8 output {sample_raw.tolist()}")

    # --- stateful behaviour -----------------------------------------------------
    st = check_stateful(models["stateful"], st_ref)
    log(f"stateful (tf.lite): 1st {vec(st['first'])} 2nd {vec(st['second'])} after reset {vec(st['after_reset'])}")

    info = {
        "desc": desc,
        "acc": acc,
        "n_train": len(x_tr),
        "n_test": len(x_te),
        "sample_index": sample_index,
        "sample_class": SAMPLE_DIGIT,
        "sample_raw": sample_raw.tolist(),
        "stateful_tf": st,
    }

    # --- ai_edge_litert check -----------------------------------------------------
    litert = None
    if args.skip_litert:
        log("ai_edge_litert check skipped (--skip-litert)")
    else:
        litert = check_with_litert(Path(args.litert_python), args.litert_wait)
        if litert is None:
            log(f"WARNING: {args.litert_python} cannot import ai_edge_litert; runtime check skipped")
        else:
            for k in ("digits", "digits_int8io", "digits_float", "digits_nchw_float"):
                assert litert[k]["argmax"] == SAMPLE_DIGIT, f"ai_edge_litert: {k} -> {litert[k]}"
            assert litert["digits"]["raw"] == sample_raw.tolist(), "ai_edge_litert output differs from tf.lite"
            ls = litert["stateful"]
            assert not np.allclose(ls["first"], ls["second"], atol=1e-4), "ai_edge_litert: stateful did not change"
            assert np.allclose(ls["recreated"], st["first"], atol=1e-5)
            log(
                f"ai_edge_litert {litert['version']}: sample -> {litert['digits']['label']} (all 4 digit models agree); "
                f"stateful 1st {vec(ls['first'])} 2nd {vec(ls['second'])}, "
                f"reset_all_variables: {ls['reset_all_variables']}"
                + (f", after reset {vec(ls['after_reset'])}" if "after_reset" in ls else "")
            )
    info["litert"] = litert

    write_model_md(info)
    write_testdata_readme(info)

    # --- summary -----------------------------------------------------------------
    written = [
        MODELS_DIR / "digits.tflite",
        MODELS_DIR / "digits_labels.txt",
        MODELS_DIR / "digits_sample.png",
        MODELS_DIR / "MODEL.md",
        init_py,
        TESTDATA_DIR / "digits_int8io.tflite",
        TESTDATA_DIR / "digits_float.tflite",
        TESTDATA_DIR / "digits_nchw_float.tflite",
        TESTDATA_DIR / "digits_batch.tflite",
        TESTDATA_DIR / "stateful.tflite",
        TESTDATA_DIR / "README.md",
    ]
    log("")
    log("summary")
    for p in written:
        size = p.stat().st_size
        assert size <= MAX_FILE_BYTES, f"{p} is {size} bytes (> {MAX_FILE_BYTES})"
        log(f"  {p.relative_to(REPO)}  {size} bytes")
    for k, d in desc.items():
        for t in d["inputs"]:
            log(f"  {k:18s} in  {t['shape']} {t['dtype']:7s} scale={t['scale']:.9g} zp={t['zero_point']}")
        for t in d["outputs"]:
            log(f"  {k:18s} out {t['shape']} {t['dtype']:7s} scale={t['scale']:.9g} zp={t['zero_point']}")
    log(f"  quantized held-out accuracy {acc['digits']:.4f} on {len(x_te)} images; sample class {SAMPLE_DIGIT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
