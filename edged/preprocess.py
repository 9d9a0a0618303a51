"""Frame bytes to input tensor: sniff, decode, convert, resize, quantize.

Runs in the worker, behind the sandbox: this is where untrusted bytes are
parsed. Every failure is a FrameError with a result code. What a frame may
cost to decode (declared sizes, scans, chunks, CPU time) is edged.imagelimits:
checked on the frame's own header before Pillow opens it, and while it decodes.
"""
from __future__ import annotations

import re
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import BmpImagePlugin, Image, JpegImagePlugin, PngImagePlugin  # noqa: F401  (plugins loaded before the sandbox)

from edged import imagelimits, modelfile
from edged.errors import FrameError
from edged.runtime import TensorInfo

MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"BM", "bmp"))
CONTENT_TYPES = {"image/jpeg": "jpeg", "image/jpg": "jpeg", "image/png": "png", "image/bmp": "bmp",
                 "image/x-ms-bmp": "bmp", "application/octet-stream": "raw"}
PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "bmp": "BMP"}
MAX_PIXELS = imagelimits.MAX_PIXELS
DECODE_CPU_S = 1.0  # default per-frame decode budget; the worker passes sandbox.frame_timeout_s / 10

Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Pillow's own caps on zTXt/iTXt/iCCP chunks (1 MiB each, 64 MiB in all by default): no frame needs that much text
PngImagePlugin.MAX_TEXT_CHUNK = 512 << 10
PngImagePlugin.MAX_TEXT_MEMORY = 2 << 20
_FILE_REPR = re.compile(r" <[\w.]+ object at 0x[0-9a-f]+>")
Image.init()  # registers every plugin now: no lazy import (a file open) under seccomp


@dataclass(frozen=True)
class Layout:
    """Where height, width and channels sit in the input tensor."""

    height: int
    width: int
    channels: int
    nchw: bool

    @classmethod
    def of(cls, info: TensorInfo) -> Layout | None:
        s = info.shape
        if len(s) == 4 and s[0] == 1 and s[3] in (1, 3):
            return cls(s[1], s[2], s[3], False)
        if len(s) == 4 and s[0] == 1 and s[1] in (1, 3):
            return cls(s[2], s[3], s[1], True)
        if len(s) == 3 and s[0] == 1:
            return cls(s[1], s[2], 1, False)
        return None


def sniff(payload: memoryview | bytes, content_type: str | None = None) -> str | None:
    """'jpeg', 'png', 'bmp' or 'raw' from the content type, else from magic bytes; None if unknown."""
    if content_type:
        kind = CONTENT_TYPES.get(content_type.split(";")[0].strip().lower())
        if kind:
            return kind
    head = bytes(payload[:8])
    for magic, kind in MAGIC:
        if head.startswith(magic):
            return kind
    return None


Norm = float | tuple[float, ...]


def model_normalization(model_path: str, info: TensorInfo, mean: float, std: float) -> tuple[Norm, Norm, str]:
    """(mean, std, where from) for the model's input: see normalization(); config values for non-float inputs."""
    if not info.dtype.startswith("float"):
        return mean, std, "config"
    return normalization(info, modelfile.input_normalization(model_path), mean, std)


def normalization(info: TensorInfo, metadata: tuple[tuple[float, ...], tuple[float, ...]] | None,
                  mean: float, std: float) -> tuple[Norm, Norm, str]:
    """(mean, std, where from) for a float input: the model's metadata when it has usable values, else config.

    Metadata values must be one number or one per channel of the input; others are
    ignored, and the returned source says why.
    """
    if metadata is None:
        return mean, std, "config"
    lay = Layout.of(info)
    channels = lay.channels if lay else 1
    m, s = metadata
    if len(m) not in (1, channels) or len(s) not in (1, channels):
        return mean, std, (f"config (the model's metadata gives {len(m)} means and {len(s)} stds "
                           f"for a {channels}-channel input)")
    return (m[0] if len(m) == 1 else m), (s[0] if len(s) == 1 else s), "model metadata"


class Preprocessor:
    """Fills a model's input tensor from frame payloads."""

    def __init__(self, info: TensorInfo, mean: Norm = 127.5, std: Norm = 127.5,
                 decode_cpu_s: float = DECODE_CPU_S) -> None:
        self.info = info
        self.decode_cpu_s = decode_cpu_s
        self.layout = Layout.of(info)
        # one value, or one per channel: shaped to broadcast over HWC or CHW pixels
        per_channel = (-1, 1, 1) if self.layout is not None and self.layout.nchw else (-1,)
        self.mean = np.asarray(mean, np.float32).reshape(per_channel if np.ndim(mean) else ())
        self.std = np.asarray(std, np.float32).reshape(per_channel if np.ndim(std) else ())

    def fill(self, dst: np.ndarray, payload: memoryview, content_type: str | None = None) -> str:
        """Write the frame into dst (the input tensor); return the kind of frame it was."""
        # a payload of exactly the input's size is a raw tensor, whatever its first bytes look like
        if content_type is None and len(payload) == self.info.nbytes:
            kind: str | None = "raw"
        else:
            kind = sniff(payload, content_type)
        if kind == "raw":
            if len(payload) != self.info.nbytes:
                raise FrameError("bad_payload", f"raw tensor of {len(payload)} bytes; the model input "
                                 f"{list(self.info.shape)} {self.info.dtype} takes {self.info.nbytes}")
            dst[...] = np.frombuffer(payload, dtype=self.info.dtype).reshape(self.info.shape)
            return kind
        if kind is None:
            if not len(payload):
                raise FrameError("bad_payload", "empty payload")
            raise FrameError("bad_payload", f"payload of {len(payload)} bytes is neither JPEG, PNG, BMP nor a raw "
                             f"tensor of {self.info.nbytes} bytes")
        if self.layout is None:
            raise FrameError("bad_payload", f"model input {list(self.info.shape)} is not an image; send raw tensors")
        pixels = self.decode(payload, kind)
        self.quantize(dst, pixels)
        return kind

    def decode(self, payload: memoryview, kind: str) -> np.ndarray:
        lay = self.layout
        assert lay is not None
        imagelimits.inspect(payload, kind)  # refused from its own header before Pillow reads it
        budget = imagelimits.CpuBudget(self.decode_cpu_s, kind)
        try:
            with warnings.catch_warnings():
                # every warning becomes an error: showing one reads a source file, which the sandbox kills
                warnings.simplefilter("error")
                img = Image.open(imagelimits.BudgetedReader(payload, budget), formats=[PIL_FORMATS[kind]])
                w, h = img.size
                if w <= 0 or h <= 0 or w * h > MAX_PIXELS:
                    raise FrameError("too_large", f"{kind} image claims {w}x{h} pixels (limit {MAX_PIXELS})")
                mode = "L" if lay.channels == 1 else "RGB"
                if kind == "jpeg":
                    img.draft(mode, (lay.width, lay.height))  # DCT-domain downscale: decodes far fewer pixels
                imagelimits.check_raster(kind, *img.size, max(len(img.getbands()), lay.channels))
                img.decodermaxblock = imagelimits.READ_BLOCK  # the budget is checked between blocks
                img.load()
                budget.check()
                img = _to_mode(img, mode)
                if img.size != (lay.width, lay.height):
                    img = img.resize((lay.width, lay.height), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.uint8)
        except FrameError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise FrameError("too_large", f"{kind} image too large: {exc}") from None
        except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, Warning) as exc:
            text = _FILE_REPR.sub("", " ".join(str(exc).split()))  # "cannot identify image file <... at 0x7f..>"
            raise FrameError("bad_payload", f"cannot decode {kind}: {text or type(exc).__name__}") from None
        except MemoryError:
            raise FrameError("too_large", f"{kind} image does not fit the worker's memory limit") from None
        return arr.reshape(lay.height, lay.width, lay.channels)

    def quantize(self, dst: np.ndarray, pixels: np.ndarray) -> None:
        """uint8 gets raw 0..255, int8 gets p - 128, float gets (p - mean) / std."""
        lay = self.layout
        assert lay is not None
        src = pixels.transpose(2, 0, 1) if lay.nchw else pixels
        dt = self.info.dtype
        if dt == "uint8":
            out = src
        elif dt == "int8":
            out = (src ^ np.uint8(0x80)).view(np.int8)
        elif dt.startswith("float"):
            out = (src.astype(np.float32) - self.mean) / self.std
        else:
            raise FrameError("bad_payload", f"model input dtype {dt} takes raw tensors only")
        dst[...] = out.reshape(dst.shape)


class _RleDecoder(BmpImagePlugin.BmpRleDecoder):
    """Pillow's BMP RLE4/RLE8 decoder, pixel for pixel, in time linear in the payload, under the budget.

    Pillow's own pads an end-of-line or a delta one pixel at a time in Python
    and reads the stream a byte per read() call: a 1 KB frame declaring a
    long row took seconds. This one reads the stream once, pads with one
    bytes multiplication, and checks the frame's CPU budget every 4096 codes.
    The output is the same for every input (tests/test_decode_budget.py
    compares the two on random streams).
    """

    def decode(self, buffer: Any) -> tuple[int, int]:
        assert self.fd is not None
        rle4 = self.args[1]
        xsize = self.state.xsize
        dest_length = xsize * self.state.ysize
        budget = getattr(self.fd, "budget", None)
        base = self.fd.tell()
        src = self.fd.read()
        n, i, x, ops = len(src), 0, 0, 0
        data = bytearray()
        while len(data) < dest_length:
            ops += 1
            if budget is not None and ops & 4095 == 0:
                budget.check()
            if i + 2 > n:
                break
            count, byte = src[i], src[i + 1]
            i += 2
            if count:  # a run
                count = min(count, max(0, xsize - x))
                if rle4:
                    pair = bytes((byte >> 4, byte & 0x0F))
                    data += pair * (count // 2) + pair[:count % 2]
                else:
                    data += bytes((byte,)) * count
                x += count
            elif byte == 0:  # end of line
                data += bytes(-len(data) % xsize)
                x = 0
            elif byte == 1:  # end of bitmap
                break
            elif byte == 2:  # delta
                if i + 2 > n:
                    break
                right, up = src[i], src[i + 1]
                i += 2
                data += bytes(max(0, min(dest_length - len(data), right + up * xsize)))
                x = len(data) % xsize
            else:  # absolute run of `byte` pixels
                want = min(dest_length - len(data), byte)
                need = (want + 1) // 2 if rle4 else want
                got = src[i:i + need]
                i += len(got)
                if rle4:
                    nibbles = bytearray()
                    for k, b in enumerate(got):
                        nibbles.append(b >> 4)
                        if k * 2 + 1 < want:
                            nibbles.append(b & 0x0F)
                    data += nibbles
                else:
                    data += got
                if len(got) < need or len(data) == dest_length:
                    break
                x += byte
                if (base + i) % 2:  # absolute runs end on a 16-bit boundary
                    i += 1
        rawmode = "L" if self.mode in {"1", "L"} else "P"
        self.set_as_raw(bytes(data), rawmode, (0, self.args[-1]))
        return -1, 0


Image.register_decoder("bmp_rle", _RleDecoder)


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    if img.mode == mode:
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # Pillow warns (an error here) when converting such palettes directly
    if mode == "L" and img.mode in ("RGB", "RGBA", "P", "LA"):
        # grey as the mean of R, G and B, as the reference preprocessing does
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint16)
        return Image.fromarray((rgb.sum(axis=2) // 3).astype(np.uint8), "L")
    return img.convert(mode)

