#!/usr/bin/env bash
# GPU accelerator checks for a machine with a Vulkan GPU (how the lent GPU machine was used):
# GPU tests, the GPU fail-over test (mode failover, or wave2 = all but the trace), the host copies (mode io), `edged check` and `edged bench` on MobileNet v2 with accelerator.prefer [gpu, cpu], and the same
# bench on the CPU for comparison. Optional carried folders: .gl (Vulkan/GL loader .debs), .whl (wheels),
# .mq (a mosquitto binary and its libraries), .m (the shared models). Outputs go to ${OUT:-/tmp/gpu-out}.
# .mq: cp /usr/sbin/mosquitto and every library `ldd` lists except libc, libm and ld-linux; mind that a
# filter on 'libdl' also drops libdlt.so.2, and then mosquitto does not start there (the e2e bench fails).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-out}; mkdir -p "$out"
if [ -d .gl ]; then for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig; fi
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ -x .mq/mosquitto ]; then
  mkdir -p /tmp/bin; printf '#!/bin/sh\nLD_LIBRARY_PATH=%s/.mq exec %s/.mq/mosquitto "$@"\n' "$PWD" "$PWD" > /tmp/bin/mosquitto
  chmod +x /tmp/bin/mosquitto; export PATH=/tmp/bin:$PATH
fi
# pyseccomp loads libseccomp.so.2 through ldconfig's cache: a carried copy in .mq when the image lacks it
if ! ldconfig -p | grep -q libseccomp.so.2 && [ -f .mq/libseccomp.so.2 ]; then
  cp .mq/libseccomp.so.2 /usr/local/lib/ && ldconfig
fi
models=${EDGED_SHARED_MODELS:-$PWD/.m}; export EDGED_SHARED_MODELS=$models
for kind in gpu cpu; do
  prefer=$([ "$kind" = cpu ] && echo "[cpu]" || echo "[$kind, cpu]")
  cat > "$out/$kind.yaml" <<YAML
device_id: gpucheck
model: {path: $models/mobilenet_v2_1.0_224_quant.tflite, labels: $models/imagenet_labels.txt, task: classify}
accelerator: {prefer: $prefer}
status: {socket: /tmp/gpucheck-$kind.sock}
YAML
done
nvidia-smi -L 2>&1 | head -2
mode=${1:-all}
if [ "$mode" = io ]; then python3 tools/gpu_io.py "$models/mobilenet_v2_1.0_224_quant.tflite" "${FRAMES:-500}"; exit 0; fi
if [ "$mode" = trace ] || [ "$mode" = all ]; then  # needs strace (.st)
  # what a GPU worker does after warm-up (.st: a carried strace and its libraries)
  st=$(command -v strace || echo "$PWD/.st/strace")
  LD_LIBRARY_PATH=$PWD/.st "$st" -f -qq -o "$out/trace.txt" python3 tools/trace_worker.py "$out/gpu.yaml" \
    "$models/cat.bmp" 2>&1 | grep accelerator
  python3 tools/trace_worker.py --summarize "$out/trace.txt"
fi
[ "$mode" = trace ] && exit 0
if [ "$mode" = failover ] || [ "$mode" = wave2 ]; then
  # issue 19 point 8: the GPU worker killed mid-stream fails over to the CPU and back
  python3 -m pytest -q -s -rs tests/test_gpu_failover.py > "$out/pytest_failover.txt" 2>&1
  grep -E "^FIGURE|passed|failed|SKIP|^E " "$out/pytest_failover.txt" | head -20
  [ "$mode" = failover ] && exit 0
fi
python3 -m pytest -q -rs tests/test_accel.py -k gpu > "$out/pytest_gpu.txt" 2>&1
grep -v "^INFO\|^WARNING\|^I0000\|^E0000" "$out/pytest_gpu.txt" | grep -E "^E |passed|failed|SKIP" | head -20
python3 tools/gpu_diag.py "$models/mobilenet_v2_1.0_224_quant.tflite" "$models/cat.bmp" 200 2>&1 | grep -E "^cpu top|^gpu fp"
[ "$mode" = tests ] && exit 0
python3 -m edged check -c "$out/gpu.yaml" 2>"$out/check.err"; echo "check exit $?"; grep -v '^INFO' "$out/check.err" | tail -3
for kind in gpu cpu; do
  python3 -m edged bench -c "$out/$kind.yaml" --frames "${FRAMES:-300}" --json > "$out/bench_$kind.json" 2>"$out/bench_$kind.err"
  python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['text'])" "$out/bench_$kind.json" || tail -5 "$out/bench_$kind.err"
done
