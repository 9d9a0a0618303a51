"""How far apart two correct integer implementations of one quantized model answer (README "Accelerator health").

    .venv/bin/python tools/selftest_tolerance.py [MODEL ...]   (default: the MobileNets in ../shared/models)

The Edge TPU cannot run here, so this measures the nearest thing: the same
uint8 graph on LiteRT's three CPU kernel sets (XNNPACK, the builtin optimized
kernels, the reference kernels), on the self-test's built frame and the shared
images. The largest output difference, in quantization steps, is a floor for
the tolerance an accelerator with its own kernels (and its own rounding) needs
against the CPU build; the top-1 is printed too.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from ai_edge_litert import interpreter as lit
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edged import selftest  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
KERNELS = {"xnnpack": {}, "builtin": {"experimental_op_resolver_type": lit.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES},
           "reference": {"experimental_op_resolver_type": lit.OpResolverType.BUILTIN_REF}}


def main(models: list[str]) -> None:
    for path in models:
        interps = {k: lit.Interpreter(model_path=path, **kw) for k, kw in KERNELS.items()}
        for it in interps.values():
            it.allocate_tensors()
        shape = tuple(interps["xnnpack"].get_input_details()[0]["shape"])
        frames = {"built": np.frombuffer(selftest.default_frame(shape, "uint8"), np.uint8).reshape(shape)}
        for img in ("cat.bmp", "grace_hopper.bmp", "kite_and_cold.jpg"):
            if (SHARED / img).exists():
                frames[img] = np.asarray(Image.open(SHARED / img).convert("RGB").resize((shape[2], shape[1])),
                                         np.uint8)[None]
        for name, x in frames.items():
            outs = {}
            for k, it in interps.items():
                it.set_tensor(it.get_input_details()[0]["index"], x)
                it.invoke()
                outs[k] = it.get_tensor(it.get_output_details()[0]["index"]).astype(int).reshape(-1)
            steps = {k: int(np.abs(o - outs["xnnpack"]).max()) for k, o in outs.items() if k != "xnnpack"}
            tops = {k: int(np.argmax(o)) for k, o in outs.items()}
            print(f"{Path(path).name} {name}: max steps vs xnnpack {steps}, top-1 {tops}, "
                  f"top score {int(outs['xnnpack'].max())}/255")


if __name__ == "__main__":
    main(sys.argv[1:] or [str(SHARED / m) for m in ("mobilenet_v1_0.25_128_quant.tflite",
                                                      "mobilenet_v2_1.0_224_quant.tflite")])
