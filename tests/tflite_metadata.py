"""Test helper: a copy of a .tflite model with TFLite metadata giving its input's normalization.

The converter writes no metadata and tflite-support's writers are a heavy
dependency, so this builds the two flatbuffers itself:

- the metadata (metadata_schema.fbs, identifier "M001"): ModelMetadata ->
  SubGraphMetadata -> TensorMetadata -> ProcessUnit(NormalizationOptions{mean, std}),
  with the flatbuffers Builder;
- the model: a new root Model table inserted right after the 8-byte header,
  whose fields point at the old model's vectors (flatbuffer offsets are
  relative, so the old bytes stay valid when shifted as a block), with the
  buffers vector extended by one Buffer holding the metadata and the metadata
  vector extended by {"TFLITE_METADATA", that buffer}. The insert is a
  multiple of 64 bytes, so the old data keeps its alignment.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

import flatbuffers


def metadata_blob(mean: Sequence[float], std: Sequence[float], name: str = "test") -> bytes:
    b = flatbuffers.Builder(256)

    def floats(values: Sequence[float]) -> int:
        b.StartVector(4, len(values), 4)
        for v in reversed(values):
            b.PrependFloat32(v)
        return b.EndVector()

    def tables(items: Sequence[int]) -> int:
        b.StartVector(4, len(items), 4)
        for t in reversed(items):
            b.PrependUOffsetTRelative(t)
        return b.EndVector()

    mean_v, std_v = floats(mean), floats(std)
    b.StartObject(2)  # NormalizationOptions
    b.PrependUOffsetTRelativeSlot(0, mean_v, 0)
    b.PrependUOffsetTRelativeSlot(1, std_v, 0)
    norm = b.EndObject()
    b.StartObject(2)  # ProcessUnit: options_type (union tag), options
    b.PrependUint8Slot(0, 1, 0)  # ProcessUnitOptions.NormalizationOptions
    b.PrependUOffsetTRelativeSlot(1, norm, 0)
    unit = b.EndObject()
    units = tables([unit])
    tname = b.CreateString("image")
    b.StartObject(7)  # TensorMetadata
    b.PrependUOffsetTRelativeSlot(0, tname, 0)
    b.PrependUOffsetTRelativeSlot(4, units, 0)
    tensor = b.EndObject()
    inputs = tables([tensor])
    b.StartObject(9)  # SubGraphMetadata
    b.PrependUOffsetTRelativeSlot(2, inputs, 0)
    sub = b.EndObject()
    subs = tables([sub])
    mname = b.CreateString(name)
    b.StartObject(8)  # ModelMetadata
    b.PrependUOffsetTRelativeSlot(0, mname, 0)
    b.PrependUOffsetTRelativeSlot(3, subs, 0)
    meta = b.EndObject()
    b.Finish(meta, file_identifier=b"M001")
    return bytes(b.Output())


def _u16(buf: bytes, pos: int) -> int:
    return int(struct.unpack_from("<H", buf, pos)[0])


def _u32(buf: bytes, pos: int) -> int:
    return int(struct.unpack_from("<I", buf, pos)[0])


def with_metadata(model: bytes, blob: bytes, name: str = "TFLITE_METADATA") -> bytes:
    """The model with one more metadata entry `name` whose buffer holds blob."""
    root = _u32(model, 0)
    vt = root - struct.unpack_from("<i", model, root)[0]
    vsize = _u16(model, vt)
    fields = {i: root + _u16(model, vt + 4 + 2 * i) for i in range((vsize - 4) // 2) if _u16(model, vt + 4 + 2 * i)}
    version = _u32(model, fields[0]) if 0 in fields else 0
    target = {i: pos + _u32(model, pos) for i, pos in fields.items() if i >= 1}  # Model fields 1.. are offsets

    def elements(i: int) -> list[int]:
        if i not in target:
            return []
        vec = target[i]
        return [vec + 4 + 4 * j + _u32(model, vec + 4 + 4 * j) for j in range(_u32(model, vec))]

    old_buffers, old_meta = elements(4), elements(6)
    n_fields = max(7, (max(fields) + 1) if fields else 7)

    # Lay out the insert; positions are absolute (the insert starts at byte 8). Offsets are
    # patched once the insert's padded size K is known: old byte x moves to x + K.
    out = bytearray()
    patches: list[tuple[int, str, int]] = []  # (absolute position of the uoffset, "new"|"old", target)

    def at() -> int:
        return 8 + len(out)

    def align(n: int) -> None:
        out.extend(b"\0" * (-at() % n))

    def uoffset(kind: str, to: int) -> None:
        patches.append((at(), kind, to))
        out.extend(b"\0\0\0\0")

    # the new root table: vtable first, then the table (all fields 4 bytes)
    align(4)
    root_vt = at()
    out.extend(struct.pack("<HH", 4 + 2 * n_fields, 4 + 4 * n_fields))
    out.extend(b"".join(struct.pack("<H", 4 + 4 * i) for i in range(n_fields)))
    align(4)
    new_root = at()
    out.extend(struct.pack("<i", new_root - root_vt))
    later: dict[str, int] = {}
    slots: dict[int, int] = {}
    for i in range(n_fields):
        slots[i] = at()
        out.extend(struct.pack("<I", version if i == 0 else 0))  # offsets are patched below
    # vectors of the buffers and of the metadata entries
    buffers_vec = at()
    out.extend(struct.pack("<I", len(old_buffers) + 1))
    for t in old_buffers:
        uoffset("old", t)
    uoffset("new", -1)  # -> the new Buffer table
    meta_vec = at()
    out.extend(struct.pack("<I", len(old_meta) + 1))
    for t in old_meta:
        uoffset("old", t)
    uoffset("new", -2)  # -> the new Metadata table
    # Metadata {name, buffer}
    mvt = at()
    out.extend(struct.pack("<HHHH", 8, 12, 4, 8))
    later["meta"] = at()
    out.extend(struct.pack("<i", later["meta"] - mvt))
    uoffset("new", -3)  # -> name string
    out.extend(struct.pack("<I", len(old_buffers)))
    # Buffer {data}
    bvt = at()
    out.extend(struct.pack("<HHH", 6, 8, 4))
    align(4)
    later["buffer"] = at()
    out.extend(struct.pack("<i", later["buffer"] - bvt))
    uoffset("new", -4)  # -> data vector
    later["name"] = at()
    out.extend(struct.pack("<I", len(name)) + name.encode() + b"\0")
    out.extend(b"\0" * (-(at() + 4) % 16))  # the data 16-byte aligned, after its length
    later["data"] = at()
    out.extend(struct.pack("<I", len(blob)) + blob)
    k = len(out) + (-len(out) % 64)
    out.extend(b"\0" * (k - len(out)))

    by_id = {-1: later["buffer"], -2: later["meta"], -3: later["name"], -4: later["data"]}
    for i in range(1, n_fields):
        if i == 4:
            patches.append((slots[i], "new", buffers_vec))
        elif i == 6:
            patches.append((slots[i], "new", meta_vec))
        elif i in target:
            patches.append((slots[i], "old", target[i]))
        else:
            # absent field: point the vtable entry at nothing
            struct.pack_into("<H", out, root_vt - 8 + 4 + 2 * i, 0)
    for pos, kind, to in patches:
        dest = by_id.get(to, to) if kind == "new" else to + k
        struct.pack_into("<I", out, pos - 8, dest - pos)
    return struct.pack("<I", new_root) + model[4:8] + bytes(out) + model[8:]


def with_normalization(model: bytes, mean: Sequence[float], std: Sequence[float]) -> bytes:
    return with_metadata(model, metadata_blob(mean, std))
