"""Accelerator choice with real native code: a fake TFLite external delegate
(tests/fake_delegate.c, compiled here with the system C compiler) stands in for
libedgetpu; `edged check` and `edged run` are driven as real processes."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import BUNDLED, ROOT, edged_cmd, shared
from edged import accel, config, postprocess, preprocess, runtime
from edged.errors import ModelError

SAMPLE_CLASS = "7"  # edged/models/MODEL.md: the held-out sample tools/build_model.py picked
DIGITS = BUNDLED / "digits.tflite"
DIGITS_OPS = 9  # QUANTIZE, 2x CONV_2D, MAX_POOL_2D, RESHAPE, 2x FULLY_CONNECTED, SOFTMAX, QUANTIZE
SOURCE = Path(__file__).resolve().parent / "fake_delegate.c"


@dataclass(frozen=True)
class FakeDelegates:
    good: Path
    failing: Path


@pytest.fixture(scope="session")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> FakeDelegates:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc) to build tests/fake_delegate.c")
    out = tmp_path_factory.mktemp("delegates")
    libs = {"good": out / "libfake_delegate.so", "failing": out / "libfake_delegate_fail.so"}
    for name, flags in (("good", []), ("failing", ["-DFAIL_CREATE"])):
        r = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", *flags, "-o", str(libs[name]),
                            str(SOURCE), "-lm"], check=False, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    return FakeDelegates(**libs)


def _cfg(tmp_path: Path, accelerator: dict[str, Any], model: dict[str, Any] | None = None) -> config.Config:
    doc = {"model": {"path": str(DIGITS), "labels": str(BUNDLED / "digits_labels.txt"), "top_k": 3, **(model or {})},
           "accelerator": accelerator}
    return config.parse(yaml.safe_dump(doc), "edged.yaml", tmp_path)


def _coral(lib: Path, **options: str) -> dict[str, Any]:
    return {"prefer": ["coral", "cpu"], "coral": {"library": str(lib), "device": "usb:0", "options": options}}


def _classify_sample(model: runtime.Model) -> dict[str, Any]:
    pre = preprocess.Preprocessor(model.input, 127.5, 127.5)
    dst = model.input_view()
    pre.fill(dst, memoryview((BUNDLED / "digits_sample.png").read_bytes()))
    del dst
    model.invoke()
    return postprocess.classify(model, postprocess.load_labels(str(BUNDLED / "digits_labels.txt")), 3)


def _loads(library: str) -> bool:
    try:
        ctypes.CDLL(library)
    except OSError:
        return False
    return True


def _record(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _no_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    gc.collect()  # a half-built runtime Delegate prints from __del__, so collect before looking
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err


# --- the backend --------------------------------------------------------------------------------------------


def test_model_backend_is_the_installed_runtime():
    installed = runtime.installed_backends()
    assert installed, "a model-level test needs LiteRT or tflite-runtime"
    expected = "litert" if "litert" in installed else "tflite-runtime"
    m = runtime.Model(str(DIGITS))
    assert m.backend == expected
    assert m.describe()["backend"] == expected
    if installed == ["tflite"]:
        assert m.backend == "tflite-runtime"  # the .venv-tflite case: tools/tflite_venv.sh


def test_backend_module_unknown_name_is_model_error():
    with pytest.raises(ModelError, match="unknown runtime backend 'onnx'"):
        runtime.backend_module("onnx")


def test_backend_module_absent_backend_is_model_error_naming_it():
    absent = [n for n in runtime.BACKENDS if n not in runtime.installed_backends()]
    if not absent:
        pytest.skip("both LiteRT and tflite-runtime are installed here")
    with pytest.raises(ModelError, match=runtime.BACKENDS[absent[0]].split(".")[0]):
        runtime.backend_module(absent[0])


def test_model_without_delegate_reports_no_delegation():
    m = runtime.Model(str(DIGITS))
    assert (m.delegated_ops, m.total_ops, m.partial) == (None, None, None)


# --- the external delegate ----------------------------------------------------------------------------------


def test_choose_fake_delegate_picks_coral_passes_options_and_still_classifies(tmp_path, fakes, capfd):
    rec = tmp_path / "record.txt"
    choice = accel.choose(_cfg(tmp_path, _coral(fakes.good, record=str(rec), foo="bar")))
    assert choice.kind == "coral" and choice.skipped == []
    lines = _record(rec)
    assert lines[0] == "create" and lines[-1] == "prepare", lines
    assert {"option device=usb:0", f"option record={rec}", "option foo=bar"} <= set(lines), lines
    assert lines.count("prepare") == 1
    top = _classify_sample(choice.model)["classes"][0]
    assert top["label"] == SAMPLE_CLASS and top["score"] > 0.9, top
    report = choice.report()
    assert report["chosen"] == "coral" and report["backend"] == choice.model.backend
    # the fake takes no node: the whole graph stays on the CPU
    assert (report["delegated_ops"], report["total_ops"], report["partial"]) == (0, DIGITS_OPS, True)
    _no_traceback(capfd)


def test_choose_coral_device_argument_overrides_config_device(tmp_path, fakes):
    rec = tmp_path / "record.txt"
    choice = accel.choose(_cfg(tmp_path, _coral(fakes.good, record=str(rec))), coral_device="pci:1")
    assert choice.kind == "coral"
    assert "option device=pci:1" in _record(rec) and "option device=usb:0" not in _record(rec)


@pytest.mark.parametrize("take,taken", [("5,6,7", 3), ("1,2,6", 3), ("0", 1), (",".join(map(str, range(9))), 9)])
def test_choose_delegate_taking_nodes_reports_delegated_and_total_ops(tmp_path, fakes, take, taken):
    choice = accel.choose(_cfg(tmp_path, _coral(fakes.good, take=take)))
    report = choice.report()
    assert report["chosen"] == "coral"
    assert (report["delegated_ops"], report["total_ops"]) == (taken, DIGITS_OPS)
    assert report["partial"] is (taken < DIGITS_OPS)


def test_choose_delegate_that_fails_to_create_falls_back_to_cpu_naming_library(tmp_path, fakes, capfd):
    choice = accel.choose(_cfg(tmp_path, _coral(fakes.failing)))
    assert choice.kind == "cpu"
    [(kind, reason)] = choice.skipped
    assert kind == "coral"
    assert str(fakes.failing) in reason and "failed to create" in reason, reason
    assert "no device answered" in reason  # what the library passed to report_error
    assert choice.report()["delegated_ops"] is None
    assert _classify_sample(choice.model)["classes"][0]["label"] == SAMPLE_CLASS
    _no_traceback(capfd)


def test_choose_missing_delegate_library_falls_back_naming_it(tmp_path, capfd):
    missing = tmp_path / "libedgetpu-nowhere.so.1"
    choice = accel.choose(_cfg(tmp_path, _coral(missing)))
    assert choice.kind == "cpu"
    [(kind, reason)] = choice.skipped
    assert kind == "coral" and str(missing) in reason and "cannot be loaded" in reason, reason
    _no_traceback(capfd)


def test_choose_library_without_delegate_symbols_falls_back_saying_so(tmp_path, capfd):
    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to stand in for a library that is not a delegate")
    choice = accel.choose(_cfg(tmp_path, _coral(Path(libm))))
    assert choice.kind == "cpu"
    assert "not a TFLite external delegate" in choice.skipped[0][1], choice.skipped
    _no_traceback(capfd)


def test_choose_coral_only_with_failing_delegate_is_model_error(tmp_path, fakes):
    acc = {**_coral(fakes.failing), "prefer": ["coral"]}
    with pytest.raises(ModelError, match="no accelerator in accelerator.prefer") as exc:
        accel.choose(_cfg(tmp_path, acc))
    assert str(fakes.failing) in str(exc.value)


# --- the daemon and the CLI ---------------------------------------------------------------------------------


def test_run_with_fake_delegate_serves_frames_on_coral(tmp_path, fakes, daemon_factory, client_factory):
    rec = tmp_path / "worker-record.txt"
    d = daemon_factory({"accelerator": _coral(fakes.good, record=str(rec), foo="bar")})
    st = d.status()
    assert st is not None and st["accelerator"]["chosen"] == "coral", st
    assert st["accelerator"]["total_ops"] == DIGITS_OPS and st["accelerator"]["partial"] is True
    c = client_factory(d.prefix)
    c.send((BUNDLED / "digits_sample.png").read_bytes(), "f1")
    res = c.wait(["f1"], 20)["f1"]
    assert res is not None and "error" not in res, res
    assert res["accelerator"] == "coral"
    assert res["classes"][0]["label"] == SAMPLE_CLASS
    lines = _record(rec)
    assert "prepare" in lines and "option foo=bar" in lines and "option device=usb:0" in lines, lines
    assert d.proc is not None and d.proc.poll() is None
    assert d.status()["workers"][0]["sandboxed"] is True


def test_run_one_worker_per_edge_tpu_frames_spread_over_them(tmp_path, fakes, daemon_factory, client_factory):
    accel_cfg = _coral(fakes.good)
    accel_cfg["coral"]["devices"] = ["usb:0", "usb:1"]
    d = daemon_factory({"accelerator": accel_cfg})
    c = client_factory(d.prefix)
    ids = [f"m{i}" for i in range(40)]
    for fid in ids:
        c.send((BUNDLED / "digits_sample.png").read_bytes(), fid)
    got = c.wait(ids, 30)
    assert all(r is not None and r["classes"][0]["label"] == SAMPLE_CLASS for r in got.values())
    workers = d.status()["workers"]
    assert len(workers) == 2 and {w["accelerator"] for w in workers} == {"coral"}
    assert all(w["served"] > 0 for w in workers), workers  # the dispatcher used both
    assert sum(w["served"] for w in workers) == 40


def test_run_n_cpu_workers_status_shows_each(daemon_factory, client_factory):
    d = daemon_factory({"accelerator": {"prefer": ["cpu"], "workers": 3}})
    workers = d.status()["workers"]
    assert len(workers) == 3 and len({w["pid"] for w in workers}) == 3
    assert all(w["sandboxed"] and w["state"] == "ready" for w in workers)


def _check(tmp_path: Path, doc: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run(edged_cmd("check", "-c", str(path)), check=False, capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)


def test_check_prefer_coral_gpu_cpu_here_chooses_cpu_with_reasons(tmp_path):
    if _loads("libedgetpu.so.1"):
        pytest.skip("libedgetpu is installed here: coral may be chosen")
    if runtime.vulkan_loader():
        pytest.skip("a Vulkan loader is installed here: the GPU may be chosen (see the GPU tests)")
    r = _check(tmp_path, {"model": {"path": str(DIGITS), "labels": str(BUNDLED / "digits_labels.txt")},
                          "accelerator": {"prefer": ["coral", "gpu", "cpu"]}})
    assert r.returncode == 0, r.stderr
    assert "accelerator  cpu (preference coral, gpu, cpu)" in r.stdout, r.stdout
    assert "skipped    coral: libedgetpu.so.1 cannot be loaded" in r.stdout, r.stdout
    gpu = [ln for ln in r.stdout.splitlines() if ln.strip().startswith("skipped    gpu:")]
    assert gpu and len(gpu[0]) > len("  skipped    gpu: ") + 10, r.stdout
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


def test_check_edgetpu_model_without_coral_exits_78_naming_edge_tpu(tmp_path):
    model = shared("mobilenet_v1_0.25_128_quant_edgetpu.tflite")
    r = _check(tmp_path, {"model": {"path": str(model), "labels": None},
                          "accelerator": {"prefer": ["coral", "cpu"], "coral": {"library": str(tmp_path / "no.so")}}})
    assert r.returncode == 78, (r.stdout, r.stderr)
    assert "Edge TPU" in r.stderr and "cpu_fallback" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr
    ours = [ln for ln in r.stderr.splitlines() if not ln.startswith("INFO: ")]  # the runtime's own notices
    assert len(ours) == 1 and ours[0].startswith("edged check: "), r.stderr


def test_check_edgetpu_model_with_cpu_fallback_exits_0_reporting_it(tmp_path):
    model = shared("mobilenet_v1_0.25_128_quant_edgetpu.tflite")
    fallback = shared("mobilenet_v1_0.25_128_quant.tflite")
    r = _check(tmp_path, {"model": {"path": str(model), "labels": None, "cpu_fallback": str(fallback)},
                          "accelerator": {"prefer": ["coral", "cpu"], "coral": {"library": str(tmp_path / "no.so")}}})
    assert r.returncode == 0, r.stderr
    assert f"model        {fallback}" in r.stdout, r.stdout
    assert "accelerator  cpu" in r.stdout and "using model.cpu_fallback" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr, r.stderr


# --- the GPU ------------------------------------------------------------------------------------------------


def _gpu_or_skip(path: str) -> "runtime.GpuModel":
    if not runtime.vulkan_loader():
        pytest.skip("no Vulkan loader (libvulkan.so.1): LiteRT's GPU accelerator needs one and a GPU adapter")
    if "litert" not in runtime.installed_backends():
        pytest.skip("LiteRT is not installed: tflite-runtime has no GPU accelerator")
    try:
        return runtime.GpuModel(path)
    except ModelError as exc:
        pytest.skip(f"Vulkan loader present but the GPU accelerator failed here: {exc}")


def test_gpu_where_adapter_exists_serves_within_two_quant_steps_of_cpu(tmp_path):
    """Runs only on a machine with a Vulkan GPU (the lent device); MobileNet v2 fully on the GPU."""
    mnv2 = str(shared("mobilenet_v2_1.0_224_quant.tflite"))
    gpu = _gpu_or_skip(mnv2)
    cpu = runtime.Model(mnv2)
    assert gpu.backend == "litert-gpu" and gpu.partial is False, "MobileNet v2 should run fully on the GPU"
    from PIL import Image

    img = np.asarray(Image.open(shared("cat.bmp")).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR),
                     np.uint8)[None]
    outs = []
    for m in (gpu, cpu):
        m.set_input(img)
        m.invoke()
        outs.append(m.output(0).astype(np.int32).reshape(-1))
    assert np.abs(outs[0] - outs[1]).max() <= 2, np.abs(outs[0] - outs[1]).max()
    assert int(np.argmax(outs[0])) == 286
    choice = accel.choose(_cfg(tmp_path, {"prefer": ["gpu", "cpu"]}))
    assert choice.kind == "gpu" and choice.report()["backend"] == "litert-gpu"


def test_gpu_without_vulkan_loader_reason_says_so(tmp_path):
    if runtime.vulkan_loader():
        pytest.skip("a Vulkan loader is installed here")
    choice = accel.choose(_cfg(tmp_path, {"prefer": ["gpu", "cpu"]}))
    assert choice.kind == "cpu"
    assert choice.skipped == [("gpu", "no Vulkan loader (libvulkan.so.1) on this machine, so no GPU adapter")]
