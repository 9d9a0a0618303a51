#!/usr/bin/env bash
# The tflite-runtime backend beside LiteRT. tflite-runtime 2.14 needs numpy<2 and LiteRT
# needs numpy>=2, so it gets a venv of its own, .venv-tflite, where it is the only runtime
# (runtime.backend_module("auto") takes whichever is installed). Creates the venv once
# (again when pyproject.toml changes), says which backend answers, then runs the model-level
# tests with it. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-tflite
STAMP=$VENV/.installed-stamp

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q 'numpy<2' tflite-runtime pillow pyyaml paho-mqtt pyseccomp psutil cryptography \
    pytest hypothesis flatbuffers
  # --no-deps: the package's own dependencies name ai-edge-litert, which would pull numpy>=2
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  touch "$STAMP"
fi

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md

from edged import runtime

model = runtime.Model("edged/models/digits.tflite")
print(f"backend: {model.backend} (installed: {', '.join(runtime.installed_backends())}; "
      f"tflite-runtime {md.version('tflite-runtime')}, numpy {md.version('numpy')})")
if model.backend != "tflite-runtime":
    raise SystemExit(f"{__import__('sys').prefix} should hold tflite-runtime only, but {model.backend} answered")
EOF

tests=()
for t in tests/test_runtime.py tests/test_postprocess.py tests/test_preprocess.py tests/test_accel.py \
         tests/test_model_files.py tests/test_batching.py tests/test_metadata.py; do
  if [ -f "$t" ]; then tests+=("$t"); else echo "note: $t does not exist, not run" >&2; fi
done
exec "$VENV/bin/python" -m pytest -q "${tests[@]}" "$@"
