"""Reading .tflite files without a runtime: a bounds check, and the input normalization from metadata.

tflite-runtime 2.14 reads offsets of a damaged model without checking them and
can read past the end of the file (a segfault in GetBuiltinCode); before it
sees a file, every table, vector and string offset is checked to stay inside
it. Not a full verifier: per-op option tables are bounds-checked, not parsed.
"""
from __future__ import annotations

import math
import mmap
import struct

from edged import userfiles
from edged.errors import ModelError

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


def check_structure(path: str, name: str) -> None:
    """Raise ModelError unless every offset in the model file stays inside it.

    tflite-runtime 2.14 does not run the flatbuffer verifier (LiteRT does): a
    truncated model made it read past the end of the file and segfault. This is
    a bounds check of the parts the interpreter reads, not a full verifier.
    """
    try:
        mapped = userfiles.map_regular(path)
    except userfiles.FileRefused as exc:
        raise ModelError(f"model {name} cannot load: {exc.why}") from None
    size = len(mapped) if mapped is not None else 0
    if mapped is None or size < 8:
        if mapped is not None:
            mapped.close()
        raise ModelError(f"model {name} cannot load: {size} bytes is too short for a TFLite model")
    try:
        with mapped as buf:
            b = _Bounds(buf)
            b.table(b.u32(0, "root offset"), "Model")
    except ValueError as exc:
        raise ModelError(f"model {name} cannot load: not a valid TFLite file ({exc})") from None


# --- TFLite model metadata (metadata_schema.fbs) ----------------------------------------------------
# The converter's models carry none; models from TF Hub / Model Maker / the metadata writers keep, in a
# buffer named by the Model's "TFLITE_METADATA" entry, a ModelMetadata flatbuffer (identifier "M001"):
# ModelMetadata.subgraph_metadata (field 3) -> SubGraphMetadata.input_tensor_metadata (2) ->
# TensorMetadata.process_units (4) -> ProcessUnit {options_type (0), options (1)}, where options type 1
# is NormalizationOptions {mean (0), std (1)}: the input is (pixel - mean) / std, per channel or one value.

_NORMALIZATION_OPTIONS = 1  # ProcessUnitOptions union: NONE 0, NormalizationOptions 1, ...


class _Fields:
    """Bounds-checked reads of flatbuffer tables, vectors and strings (raises ValueError)."""

    def __init__(self, buf: bytes | memoryview | mmap.mmap) -> None:
        self.buf = buf
        self.b = _Bounds(buf)

    def root(self) -> int:
        return self.b.u32(0, "root offset")

    def field(self, table: int, i: int) -> int | None:
        """Absolute position of field i of the table at `table`, or None when absent."""
        self.b.need(table, 4, "table")
        vt = table - struct.unpack_from("<i", self.buf, table)[0]
        self.b.need(vt, 4, "vtable")
        vsize, tsize = struct.unpack_from("<HH", self.buf, vt)
        slot = 4 + 2 * i
        if slot + 2 > vsize:
            return None
        self.b.need(vt, vsize, "vtable")
        off = struct.unpack_from("<H", self.buf, vt + slot)[0]
        if off == 0:
            return None
        self.b.need(table, tsize, "table")
        return table + off

    def ref(self, table: int, i: int) -> int | None:
        """Target of offset field i (a table, vector or string), or None."""
        pos = self.field(table, i)
        return None if pos is None else pos + self.b.u32(pos, "offset")

    def scalar(self, table: int, i: int, fmt: str, default: int = 0) -> int:
        pos = self.field(table, i)
        if pos is None:
            return default
        self.b.need(pos, struct.calcsize(fmt), "scalar")
        return int(struct.unpack_from("<" + fmt, self.buf, pos)[0])

    def tables(self, vec: int | None) -> list[int]:
        if vec is None:
            return []
        n = self.b.u32(vec, "vector")
        self.b.need(vec + 4, 4 * n, "vector")
        return [vec + 4 + 4 * j + self.b.u32(vec + 4 + 4 * j, "vector") for j in range(n)]

    def string(self, pos: int | None) -> str:
        if pos is None:
            return ""
        n = self.b.u32(pos, "string")
        self.b.need(pos + 4, n, "string")
        return bytes(self.buf[pos + 4:pos + 4 + n]).decode("utf-8", "replace")

    def floats(self, vec: int | None) -> tuple[float, ...]:
        if vec is None:
            return ()
        n = self.b.u32(vec, "vector")
        self.b.need(vec + 4, 4 * n, "vector")
        return struct.unpack_from(f"<{n}f", self.buf, vec + 4)

    def blob(self, vec: int | None) -> bytes:
        if vec is None:
            return b""
        n = self.b.u32(vec, "vector")
        self.b.need(vec + 4, n, "vector")
        return bytes(self.buf[vec + 4:vec + 4 + n])


def metadata_blob(buf: bytes | memoryview | mmap.mmap, name: str = "TFLITE_METADATA") -> bytes | None:
    """The bytes of the model's metadata buffer called `name`, or None (raises ValueError on a bad file)."""
    f = _Fields(buf)
    model = f.root()
    for meta in f.tables(f.ref(model, 6)):
        if f.string(f.ref(meta, 0)) != name:
            continue
        buffers = f.tables(f.ref(model, 4))
        idx = f.scalar(meta, 1, "I")
        if idx >= len(buffers):
            raise ValueError(f"metadata {name} names buffer {idx} of {len(buffers)}")
        data = f.ref(buffers[idx], 0)
        if data is not None:
            return f.blob(data)
        start, size = f.scalar(buffers[idx], 1, "Q"), f.scalar(buffers[idx], 2, "Q")
        if start > 1:  # models past 2 GB keep buffers after the flatbuffer
            f.b.need(start, size, "buffer data")
            return bytes(buf[start:start + size])
        return b""
    return None


def input_normalization(path: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) of the first input from the model's TFLite metadata, or None when it has none.

    A model without metadata, or whose metadata cannot be read, gives None: the
    config's model.mean / model.std apply then. Each tuple holds one value or one per channel.
    """
    try:
        mapped = userfiles.map_regular(path)
        if mapped is None:
            return None
        with mapped as buf:
            blob = metadata_blob(buf)
        if not blob:
            return None
        f = _Fields(blob)
        meta = f.root()
        for sub in f.tables(f.ref(meta, 3))[:1]:
            for tensor in f.tables(f.ref(sub, 2))[:1]:
                for unit in f.tables(f.ref(tensor, 4)):
                    if f.scalar(unit, 0, "B") != _NORMALIZATION_OPTIONS:
                        continue
                    opts = f.ref(unit, 1)
                    if opts is None:
                        continue
                    mean, std = f.floats(f.ref(opts, 0)), f.floats(f.ref(opts, 1))
                    if mean and std and all(map(math.isfinite, mean + std)) and all(s != 0 for s in std):
                        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
        return None
    except (OSError, ValueError, struct.error):
        return None
