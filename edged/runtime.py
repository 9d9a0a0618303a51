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
import ctypes.util
import importlib
import importlib.util
import logging
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edged.errors import ModelError

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

    @property
    def nbytes(self) -> int:
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
        self.delegated_ops: int | None = None
        self.total_ops: int | None = None
        if self.backend == "tflite-runtime":
            _check_structure(path, self.name)
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


# Where the TFLite schema (schema.fbs) holds offsets, by table: field index -> kind.
# "str" string, "v<n>" vector of n-byte scalars, "t:T" table, "vt:T" vector of tables.
# "Any" is a table read by the runtime's own option parsers: its bounds are checked, not its fields.
_SCHEMA: dict[str, dict[int, str]] = {
    "Model": {1: "vt:OperatorCode", 2: "vt:SubGraph", 3: "str", 4: "vt:Buffer", 5: "v4", 6: "vt:Metadata",
              7: "vt:SignatureDef", 8: "vt:Any", 9: "vt:Any"},
    "OperatorCode": {1: "str"},
    "SubGraph": {0: "vt:Tensor", 1: "v4", 2: "v4", 3: "vt:Operator", 4: "str"},
    "Tensor": {0: "v4", 3: "str", 4: "t:Quantization", 6: "t:Sparsity", 7: "v4", 9: "vt:VariantSubType"},
    "Quantization": {0: "v4", 1: "v4", 2: "v4", 3: "v8", 5: "t:Any"},
    "Sparsity": {0: "v4", 1: "v4", 2: "vt:DimensionMetadata"},
    "DimensionMetadata": {3: "t:IndexVector", 5: "t:IndexVector"},
    "IndexVector": {0: "v1"},  # Int32Vector, Uint16Vector or Uint8Vector: length checked at 1 byte each
    "VariantSubType": {0: "v4"},
    "Operator": {1: "v4", 2: "v4", 4: "t:Any", 5: "v1", 7: "v1", 8: "v4", 12: "t:Any"},
    "Buffer": {0: "v1"},
    "Metadata": {0: "str"},
    "SignatureDef": {0: "vt:TensorMap", 1: "vt:TensorMap", 2: "str"},
    "TensorMap": {0: "str"},
    "Any": {},
}
# Data kept outside the flatbuffer in models past 2 GB: (offset field, size field), both uint64 from
# the start of the file; an offset of 0 or 1 means "not used" (schema.fbs).
_SPANS: dict[str, tuple[int, int]] = {"Buffer": (1, 2), "Operator": (9, 10)}


class _Bounds:
    """Checks that every table, vector and string the interpreter will read lies inside the file."""

    def __init__(self, buf: bytes | mmap.mmap) -> None:
        self.buf = buf
        self.size = len(buf)
        self.seen: set[tuple[int, str]] = set()  # shared tables are checked once: no blow-up by aliasing

    def need(self, pos: int, n: int, what: str) -> None:
        if pos < 0 or n < 0 or pos + n > self.size:
            raise ValueError(f"{what} at byte {pos} runs past the end of the {self.size}-byte file")

    def u32(self, pos: int, what: str) -> int:
        self.need(pos, 4, what)
        return int(struct.unpack_from("<I", self.buf, pos)[0])

    def table(self, pos: int, name: str) -> None:
        if (pos, name) in self.seen:
            return
        self.seen.add((pos, name))
        self.need(pos, 4, name)
        vt = pos - struct.unpack_from("<i", self.buf, pos)[0]
        self.need(vt, 4, f"{name} vtable")
        vsize, tsize = struct.unpack_from("<HH", self.buf, vt)
        if vsize < 4 or vsize % 2:
            raise ValueError(f"{name} at byte {pos} has a malformed vtable")
        self.need(vt, vsize, f"{name} vtable")
        self.need(pos, tsize, name)
        for i, kind in _SCHEMA[name].items():
            slot = 4 + 2 * i
            if slot >= vsize:
                continue
            off = struct.unpack_from("<H", self.buf, vt + slot)[0]
            if off == 0:
                continue
            if off + 4 > tsize:
                raise ValueError(f"{name} field {i} at byte {pos} lies outside its table")
            field_pos = pos + off
            self.ref(field_pos + self.u32(field_pos, name), kind, f"{name} field {i}")
        if name in _SPANS:
            start, size = (self.u64(pos, vt, vsize, tsize, i) for i in _SPANS[name])
            if start > 1:
                self.need(start, size, f"{name} data")

    def u64(self, pos: int, vt: int, vsize: int, tsize: int, i: int) -> int:
        """A uint64 scalar field of the table at pos (0 when absent)."""
        slot = 4 + 2 * i
        off = struct.unpack_from("<H", self.buf, vt + slot)[0] if slot < vsize else 0
        if off == 0:
            return 0
        if off + 8 > tsize:
            raise ValueError(f"field {i} of the table at byte {pos} lies outside it")
        return int(struct.unpack_from("<Q", self.buf, pos + off)[0])

    def ref(self, pos: int, kind: str, what: str) -> None:
        if kind.startswith("t:"):
            self.table(pos, kind[2:])
            return
        n = self.u32(pos, what)
        if kind == "str":
            self.need(pos + 4, n + 1, what)
        elif kind.startswith("vt:"):
            self.need(pos + 4, 4 * n, what)
            for j in range(n):
                elem = pos + 4 + 4 * j
                self.table(elem + self.u32(elem, what), kind[3:])
        else:
            self.need(pos + 4, n * int(kind[1:]), what)


def _check_structure(path: str, name: str) -> None:
    """Raise ModelError unless every offset in the model file stays inside it.

    tflite-runtime 2.14 does not run the flatbuffer verifier (LiteRT does): a
    truncated model made it read past the end of the file and segfault. This is
    a bounds check of the parts the interpreter reads, not a full verifier.
    """
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise ModelError(f"model {name} cannot load: {size} bytes is too short for a TFLite model")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                b = _Bounds(buf)
                b.table(b.u32(0, "root offset"), "Model")
    except ValueError as exc:
        raise ModelError(f"model {name} cannot load: not a valid TFLite file ({exc})") from None
    except OSError as exc:
        raise ModelError(f"model {name} cannot load: {exc.strerror}") from None


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


def gpu_unavailable(path: str) -> str:
    """Why LiteRT's GPU accelerator cannot serve this model here (always a reason: see accel)."""
    if ctypes.util.find_library("vulkan") is None:
        return "no Vulkan loader (libvulkan.so.1) on this machine, so no GPU adapter"
    try:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    except ImportError:
        return "this runtime has no GPU accelerator (LiteRT's CompiledModel is not installed)"
    try:
        cm = CompiledModel.from_file(path, hardware_accel=HardwareAccelerator.GPU)
    except (RuntimeError, ValueError, OSError) as exc:  # what the native layer raises, unwrapped
        text = " ".join(str(exc).split())
        hint = "" if "adapter" in text.lower() else " (no usable Vulkan GPU adapter?)"
        return f"LiteRT GPU accelerator failed: {text[:200] or type(exc).__name__}{hint}"
    full = cm.is_fully_accelerated()
    cm.close()
    return (f"a GPU answered (fully accelerated: {full}), but edged serves models through the Interpreter "
            "API and does not run LiteRT's CompiledModel yet")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
