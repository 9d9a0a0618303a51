"""The bounds check (edged/modelfile.py) runtime.py runs before tflite-runtime reads a model file (that runtime does
not verify flatbuffers and segfaulted on a truncated model): real models pass, damaged ones
are refused with a ModelError that names the file."""
from __future__ import annotations

import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BUNDLED, DATA, SHARED
from edged import modelfile, runtime
from edged.errors import ModelError

MODELS = sorted([*BUNDLED.glob("*.tflite"), *DATA.glob("*.tflite"), *SHARED.glob("*.tflite")])


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_check_structure_real_model_passes(path):
    modelfile.check_structure(str(path), path.name)


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
def test_check_structure_truncated_model_refused_naming_file(tmp_path, fraction):
    data = (BUNDLED / "digits.tflite").read_bytes()
    path = tmp_path / "cut.tflite"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelError, match=r"model cut.tflite cannot load: not a valid TFLite file \(.*runs past"):
        modelfile.check_structure(str(path), path.name)


@pytest.mark.parametrize("payload", [b"", b"TFL3", b"\x1c\x00\x00\x00TFL3" + bytes(range(256)) * 16],
                         ids=["empty", "short", "noise"])
def test_check_structure_non_model_refused(tmp_path, payload):
    path = tmp_path / "junk.tflite"
    path.write_bytes(payload)
    with pytest.raises(ModelError, match="junk.tflite") as exc:
        modelfile.check_structure(str(path), path.name)
    assert "\n" not in str(exc.value)


def _buffer_table(offset: int, size: int) -> bytes:
    """A root Buffer table whose data lies outside the flatbuffer (models past 2 GB): offset, size from file start."""
    vtable = struct.pack("<HHHHH", 10, 20, 0, 4, 12) + b"\0\0"  # vsize, tsize, data absent, offset@4, size@12
    table = struct.pack("<iQQ", 16 - 4, offset, size)  # soffset back to the vtable at byte 4
    return struct.pack("<I", 16) + vtable + table


@pytest.mark.parametrize("offset,size,ok", [(1, 1, True), (0, 0, True), (30, 6, True), (30, 7, False),
                                            (1 << 40, 8, False)])
def test_bounds_buffer_data_outside_flatbuffer_must_lie_in_file(offset, size, ok):
    buf = _buffer_table(offset, size)
    assert len(buf) == 36
    b = modelfile._Bounds(buf)
    if ok:
        b.table(16, "Buffer")
    else:
        with pytest.raises(ValueError, match="Buffer data"):
            b.table(16, "Buffer")


def test_check_structure_mutants_that_pass_do_not_crash_tflite_runtime(tmp_path):
    """Seeded damage to digits.tflite: whatever the check lets through, tflite-runtime loads without a crash."""
    if "tflite" not in runtime.installed_backends():
        pytest.skip("tflite-runtime is not installed here (tools/tflite_venv.sh runs this in .venv-tflite)")
    rng = random.Random(7)
    src = (BUNDLED / "digits.tflite").read_bytes()
    passed: list[Path] = []
    for k in range(60):
        data = bytearray(src)
        if k % 2:
            data = data[: rng.randrange(8, len(data))]
        else:
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(0, len(data) - 4) & ~3
                data[i : i + 4] = rng.randrange(2**32).to_bytes(4, "little")
        path = tmp_path / f"m{k}.tflite"
        path.write_bytes(bytes(data))
        try:
            modelfile.check_structure(str(path), path.name)
        except ModelError:
            continue
        passed.append(path)
    script = ("import sys\nfrom tflite_runtime.interpreter import Interpreter\nfor p in sys.argv[1:]:\n"
              "    try:\n        i = Interpreter(model_path=p); i.allocate_tensors(); i.invoke()\n"
              "    except Exception:\n        pass\n")
    r = subprocess.run([sys.executable, "-c", script, *map(str, passed)], check=False, capture_output=True,
                       timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
