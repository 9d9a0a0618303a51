"""The model runtime: one small face over LiteRT and tflite-runtime.

The only module that imports an interpreter. It loads a model with an
accelerator's delegate (or none), counts the ops the delegate took, describes
its tensors, and translates the runtime's errors into ModelError naming the
model and the cause. The backend is whichever runtime is installed (LiteRT
first); under tflite-runtime, which does not verify model files, the file's
offsets are bounds-checked before the interpreter reads it. Runs inside the
worker process (and `edged check`).
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edged import userfiles
from edged.errors import ModelError
from edged.modelfile import check_structure

logger = logging.getLogger(__name__)

BACKENDS = {"litert": "ai_edge_litert.interpreter", "tflite": "tflite_runtime.interpreter"}
ALIASES = {"tflite-runtime": "tflite", "tflite_runtime": "tflite", "ai_edge_litert": "litert"}
DELEGATE_OP = "DELEGATE"  # the op name of a delegate kernel node in the interpreter's node list
EDGETPU_OP = "edgetpu-custom-op"


@dataclass(frozen=True)
class TensorInfo:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int

    @functools.cached_property
    def nbytes(self) -> int:  # read per frame: computed once (np.prod and np.dtype cost microseconds)
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "quantization": [self.scale, self.zero_point] if self.scale else None}


def installed_backends() -> list[str]:
    """The backends whose package is installed here, LiteRT first (nothing is imported)."""
    return [n for n, mod in BACKENDS.items() if importlib.util.find_spec(mod.split(".")[0]) is not None]


def backend_module(name: str = "auto") -> Any:
    """Import the interpreter module of a backend: 'litert', 'tflite', or 'auto' (what is installed, LiteRT first).

    Each venv holds one runtime (tflite-runtime needs numpy<2, LiteRT numpy>=2), so
    'auto' asks which package is installed rather than taking a setting.
    """
    key = ALIASES.get(name, name)
    if key != "auto" and key not in BACKENDS:
        raise ModelError(f"unknown runtime backend {name!r} (known: auto, {', '.join(BACKENDS)})")
    names = installed_backends() if key == "auto" else [key]
    errors = []
    for n in names:
        try:
            return importlib.import_module(BACKENDS[n])
        except ImportError as exc:
            # installed but broken, e.g. tflite-runtime under numpy 2
            errors.append(f"{BACKENDS[n]}: {_first_line(exc)}")
            logger.warning("runtime %s is installed but cannot be imported: %s", n, _first_line(exc))
    tried = "; ".join(errors) or f"none of {', '.join(BACKENDS[n].split('.')[0] for n in BACKENDS)} is installed"
    raise ModelError(f"no TFLite runtime can be used ({tried})")


def backend_name(module: Any) -> str:
    return "litert" if module.__name__.startswith("ai_edge_litert") else "tflite-runtime"


def needs_edgetpu(path: str) -> bool:
    """True when the model file holds the Edge TPU custom op (it cannot run without a Coral).

    The file is mapped, not read: a model of any size costs no memory here, and a
    path that is not a regular file (/dev/zero, a FIFO) is a ModelError at once.
    """
    try:
        buf = userfiles.map_regular(path)
    except userfiles.FileRefused as exc:
        raise ModelError(f"model {exc}") from None
    if buf is None:
        return False
    with buf:
        return buf.find(EDGETPU_OP.encode()) != -1


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
            raise ModelError(f"model {userfiles.not_regular(path) or f'{path}: no such file'}")
        self.delegated_ops: int | None = None
        self.total_ops: int | None = None
        if self.backend == "tflite-runtime":
            check_structure(path, self.name)
        try:
            self._interp = mod.Interpreter(model_path=path, num_threads=threads,
                                           experimental_delegates=delegates or None)
            if delegates:
                # counted before allocate_tensors(): that is where the runtime adds its own
                # XNNPACK delegate, whose nodes would otherwise count as the accelerator's
                self.delegated_ops, self.total_ops = _delegation(self._interp)
            self._interp.allocate_tensors()
            # names are decoded as UTF-8 here: a corrupt one raises UnicodeDecodeError (a ValueError)
            inputs = self._interp.get_input_details()
            outputs = self._interp.get_output_details()
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"model {self.name} cannot load: {_first_line(exc)}") from None
        if len(inputs) != 1:
            raise ModelError(f"model {self.name}: edged serves models with one input, this one has {len(inputs)}")
        self.input = _info(inputs[0])
        self.outputs = [_info(d) for d in outputs]
        self.stateful = False

    @property
    def partial(self) -> bool | None:
        """True when a delegate was applied but some ops still run on the CPU (None: no delegate or unknown)."""
        if self.delegated_ops is None or self.total_ops is None:
            return None
        return self.delegated_ops < self.total_ops

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
        return dequantize(self.outputs[i], self.output(i))

    # -- batching: several frames in one invoke, for models whose batch dimension resizes --

    batch = 1  # frames the input tensor holds now

    def batch_refusal(self, n: int) -> str | None:
        """Why this model cannot run `n` frames per invoke (None: it can; left at batch 1 either way)."""
        if self.stateful:
            return "the model keeps state between invokes"
        sig = self._interp.get_input_details()[0].get("shape_signature")
        if sig is None or len(sig) == 0 or int(sig[0]) != -1:
            return f"its input's batch dimension is fixed (shape signature {list(sig) if sig is not None else '?'})"
        if self.input.shape[0] != 1:
            return f"its input holds {self.input.shape[0]} frames already"
        try:
            self.set_batch(n)
            self._interp.invoke()  # output shapes of a dynamic graph are known after an invoke
            outs = [self._interp.get_tensor(o.index) for o in self.outputs]
            bad = [o.name for o, a in zip(self.outputs, outs, strict=False) if a.ndim == 0 or a.shape[0] != n]
            if bad:
                return f"output {bad[0]} does not follow the batch dimension"
        except (ValueError, RuntimeError) as exc:
            return f"the runtime cannot resize it to {n}: {_first_line(exc)}"
        finally:
            try:
                self.set_batch(1)
            except (ValueError, RuntimeError):
                pass
        return None

    def set_batch(self, n: int) -> None:
        """Resize the input to `n` frames (a no-op when it holds that many); input_view() then has n rows."""
        if n == self.batch:
            return
        self._interp.resize_tensor_input(self.input.index, [n, *self.input.shape[1:]])
        self._interp.allocate_tensors()
        self.batch = n

    def warm_up(self) -> None:
        """Run twice on zeros: primes caches and tells whether state leaks between invokes."""
        zeros = np.zeros(self.input.shape, self.input.dtype)
        outs = []
        for _ in range(2):
            self.set_input(zeros)
            self.invoke()
            outs.append([self.output(i).copy() for i in range(len(self.outputs))])
        if any(not np.array_equal(a, b, equal_nan=True) for a, b in zip(*outs, strict=False)):
            # variable tensors (LSTM state and the like) carry over: reset before every frame
            self.stateful = True
            logger.info("model %s keeps state between invokes; resetting it before each frame", self.name)

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "input": {"shape": list(self.input.shape), "dtype": self.input.dtype},
                "outputs": [o.describe() for o in self.outputs], "backend": self.backend,
                "stateful": self.stateful}


def dequantize(info: TensorInfo, raw: np.ndarray) -> np.ndarray:
    if info.scale:
        return (raw.astype(np.float32) - info.zero_point) * np.float32(info.scale)
    return raw


class RowView:
    """Frame `row` of a batched invoke, with the face of a batch-1 Model that postprocess reads."""

    def __init__(self, model: Model, row: int) -> None:
        self.model = model
        self.row = row
        self.name = model.name
        self.outputs = model.outputs

    def output(self, i: int) -> np.ndarray:
        return self.model.output(i)[self.row : self.row + 1]

    def dequantized(self, i: int) -> np.ndarray:
        return dequantize(self.outputs[i], self.output(i))


def _delegation(interp: Any) -> tuple[int | None, int | None]:
    """(ops a delegate took, ops in the model) from the node list, or (None, None) if it cannot be read.

    Neither runtime has a public API for this; `_get_ops_details()` (private,
    "experimental" in both LiteRT and tflite-runtime) lists the model's nodes
    followed by one DELEGATE node per delegated partition. A node belongs to a
    partition when one of its outputs is a partition output, or feeds a node of
    the partition without being a partition input.
    """
    try:
        ops = interp._get_ops_details()
    except (AttributeError, ValueError, RuntimeError) as exc:
        logger.debug("cannot list nodes to count delegated ops: %s", exc)
        return None, None
    model_ops = [op for op in ops if op.get("op_name") != DELEGATE_OP]
    kernels = [op for op in ops if op.get("op_name") == DELEGATE_OP]
    part_in = {int(t) for k in kernels for t in k["inputs"]}
    part_out = {int(t) for k in kernels for t in k["outputs"]}
    consumers: dict[int, list[int]] = {}
    for op in model_ops:
        for t in op["inputs"]:
            consumers.setdefault(int(t), []).append(int(op["index"]))
    taken: set[int] = set()
    for op in reversed(model_ops):  # node order is execution order: consumers come later
        for t in (int(x) for x in op["outputs"]):
            if t in part_out or (t not in part_in and any(c in taken for c in consumers.get(t, ()))):
                taken.add(int(op["index"]))
                break
    return len(taken), len(model_ops)


class GpuModel(Model):
    """The same model on LiteRT's GPU accelerator (CompiledModel, WebGPU over Vulkan), behind Model's face.

    The CPU interpreter is loaded first only to read the tensor details and their
    quantization (CompiledModel reports none), then dropped. Frames are written
    into a host array and copied into the GPU input buffer at invoke().
    """

    def __init__(self, path: str, *, threads: int = 1, fp32: bool = False) -> None:
        if not vulkan_loader():
            raise ModelError("no Vulkan loader (libvulkan.so.1) on this machine, so no GPU adapter")
        try:
            from ai_edge_litert.compiled_model import CompiledModel
            from ai_edge_litert.gpu_options import GpuOptions
            from ai_edge_litert.hardware_accelerator import HardwareAccelerator
            from ai_edge_litert.options import Options
        except ImportError:
            raise ModelError("this runtime has no GPU accelerator (LiteRT's CompiledModel is missing)") from None
        super().__init__(path, threads=threads)
        try:
            opts = Options(HardwareAccelerator.GPU, gpu_options=GpuOptions(enforce_f32=fp32))
            self._cm = CompiledModel.from_file(path, options=opts)
            sig: dict[str, Any] = next(iter(self._cm.get_signature_list().values()), {})
            self._ins = self._cm.create_input_buffers(0)
            self._outs = self._cm.create_output_buffers(0)
            self.fully_accelerated = bool(self._cm.is_fully_accelerated())
        except (RuntimeError, ValueError, OSError, TypeError) as exc:
            text = " ".join(str(exc).split())
            raise ModelError(f"LiteRT GPU accelerator failed: {text[:200] or type(exc).__name__}") from None
        names = list(sig.get("outputs", []))
        # buffer order follows the signature; our outputs follow the interpreter: match them by name
        self._out_pos = [names.index(o.name) if o.name in names else i for i, o in enumerate(self.outputs)]
        self._host_in = np.zeros(self.input.shape, self.input.dtype)
        self.backend = "litert-gpu"
        del self._interp

    @property
    def partial(self) -> bool | None:
        return not self.fully_accelerated

    def input_view(self) -> np.ndarray:
        return self._host_in

    def set_input(self, array: np.ndarray) -> None:
        self._host_in[...] = array

    def invoke(self) -> None:
        try:
            self._ins[0].write(self._host_in)
            self._cm.run_by_index(0, self._ins, self._outs)
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"GPU invoke failed: {_first_line(exc)}") from None

    def run_bare(self) -> None:
        """Run on what the GPU input buffer holds, without the host copies: the bench's anchor."""
        self._cm.run_by_index(0, self._ins, self._outs)

    def output(self, i: int) -> np.ndarray:
        info = self.outputs[i]
        n = int(np.prod(info.shape))
        return np.asarray(self._outs[self._out_pos[i]].read(n, np.dtype(info.dtype))).reshape(info.shape)


def load_delegate(library: str, options: dict[str, str], backend: str = "auto") -> Any:
    """Load a TFLite external delegate (e.g. libedgetpu) or raise ModelError naming the library and cause."""
    mod = backend_module(backend)
    # Checked here first: when dlopen fails or a symbol is missing, the runtime's Delegate
    # object is left half-built and its __del__ prints a traceback on stderr.
    try:
        lib = ctypes.CDLL(library)
    except OSError as exc:
        raise ModelError(f"{library} cannot be loaded: {_first_line(exc)}") from None
    for sym in ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate"):
        if not hasattr(lib, sym):
            raise ModelError(f"{library} is not a TFLite external delegate (it has no {sym})")
    try:
        return mod.load_delegate(library, options)
    except ValueError as exc:
        # "Failed to load delegate from LIB\n<what the library reported>"
        said = " ".join(str(exc).splitlines()[1:]).strip() or "it gave no reason"
        raise ModelError(f"{library} failed to create a delegate (tflite_plugin_create_delegate returned NULL): "
                         f"{said[:300]}") from None
    except (RuntimeError, OSError, AttributeError) as exc:
        raise ModelError(f"{library}: {_first_line(exc)}") from None


def vulkan_loader() -> bool:
    """True when libvulkan.so.1 loads here (what LiteRT's WebGPU accelerator opens to find a GPU)."""
    try:
        ctypes.CDLL("libvulkan.so.1")
    except OSError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
