"""The model runtime: one small face over LiteRT and tflite-runtime.

The only module that imports an interpreter. It loads a model with an
accelerator's delegate (or none), describes its tensors, and translates the
runtime's errors into ModelError naming the model and the cause. Runs inside
the worker process only.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edged.errors import ModelError

logger = logging.getLogger(__name__)

BACKENDS = {"litert": "ai_edge_litert.interpreter", "tflite": "tflite_runtime.interpreter"}
EDGETPU_OP = "edgetpu-custom-op"


@dataclass(frozen=True)
class TensorInfo:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "quantization": [self.scale, self.zero_point] if self.scale else None}


def backend_module(name: str = "auto") -> Any:
    """Import the interpreter module of a backend ('auto' prefers LiteRT)."""
    names = list(BACKENDS) if name == "auto" else [name]
    for n in names:
        try:
            return importlib.import_module(BACKENDS[n])
        except ImportError:
            continue
    raise ModelError(f"no TFLite runtime installed (tried {', '.join(BACKENDS[n] for n in names)})")


def backend_name(module: Any) -> str:
    return "litert" if module.__name__.startswith("ai_edge_litert") else "tflite-runtime"


def needs_edgetpu(path: str) -> bool:
    """True when the model file holds the Edge TPU custom op (it cannot run without a Coral)."""
    try:
        with open(path, "rb") as fh:
            return EDGETPU_OP.encode() in fh.read()
    except OSError:
        return False


def _info(d: dict[str, Any]) -> TensorInfo:
    scale, zp = d.get("quantization", (0.0, 0))
    return TensorInfo(int(d["index"]), str(d["name"]), tuple(int(x) for x in d["shape"]),
                      np.dtype(d["dtype"]).name, float(scale), int(zp))


class Model:
    """A loaded, allocated interpreter; invoke() on what fill() put in."""

    def __init__(self, path: str, *, threads: int = 1, delegates: list[Any] | None = None,
                 backend: str = "auto") -> None:
        self.path = path
        self.name = Path(path).name
        mod = backend_module(backend)
        self.backend = backend_name(mod)
        if not Path(path).is_file():
            raise ModelError(f"model {path}: no such file")
        try:
            self._interp = mod.Interpreter(model_path=path, num_threads=threads,
                                           experimental_delegates=delegates or None)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"model {self.name} cannot load: {_first_line(exc)}") from None
        inputs = self._interp.get_input_details()
        if len(inputs) != 1:
            raise ModelError(f"model {self.name}: edged serves models with one input, this one has {len(inputs)}")
        self.input = _info(inputs[0])
        self.outputs = [_info(d) for d in self._interp.get_output_details()]
        self.stateful = False
        self.delegated_nodes: int | None = None

    def input_view(self) -> np.ndarray:
        """A writable view of the input tensor; drop it before invoke()."""
        return self._interp.tensor(self.input.index)()

    def set_input(self, array: np.ndarray) -> None:
        self._interp.set_tensor(self.input.index, array)

    def invoke(self) -> None:
        if self.stateful:
            self._interp.reset_all_variables()
        try:
            self._interp.invoke()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"invoke failed: {_first_line(exc)}") from None

    def output(self, i: int) -> np.ndarray:
        return self._interp.get_tensor(self.outputs[i].index)

    def dequantized(self, i: int) -> np.ndarray:
        info = self.outputs[i]
        raw = self.output(i)
        if info.scale:
            return (raw.astype(np.float32) - info.zero_point) * np.float32(info.scale)
        return raw

    def warm_up(self) -> None:
        """Run twice on zeros: primes caches and tells whether state leaks between invokes."""
        zeros = np.zeros(self.input.shape, self.input.dtype)
        outs = []
        for _ in range(2):
            self.set_input(zeros)
            self.invoke()
            outs.append([self.output(i).copy() for i in range(len(self.outputs))])
        if any(not np.array_equal(a, b, equal_nan=True) for a, b in zip(*outs)):
            # variable tensors (LSTM state and the like) carry over: reset before every frame
            self.stateful = True
            logger.info("model %s keeps state between invokes; resetting it before each frame", self.name)

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "input": {"shape": list(self.input.shape), "dtype": self.input.dtype},
                "outputs": [o.describe() for o in self.outputs], "backend": self.backend,
                "stateful": self.stateful}


def load_delegate(library: str, options: dict[str, str], backend: str = "auto") -> Any:
    """Load an external delegate (e.g. libedgetpu) or raise ModelError with the cause."""
    mod = backend_module(backend)
    try:
        return mod.load_delegate(library, options)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelError(f"{library}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
