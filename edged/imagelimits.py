"""Decode budgets: what one encoded frame may cost the worker, checked before and during decoding.

Runs in the worker (stdlib only). ``inspect()`` reads the frame's own header
and structure, not Pillow's, and refuses a frame from what it declares before
a single pixel is decoded; ``CpuBudget``/``BudgetedReader`` bound what is left
while Pillow decodes. Refusals are FrameError: ``too_large`` for sizes and
budgets, ``bad_payload`` for structure no encoder writes.

Per format (the limits below; each is far past what a camera, phone or
screenshot produces, and what a 40 MP frame needs):
- every format: each side <= MAX_SIDE, width x height <= MAX_PIXELS; the
  raster Pillow holds, pixels x channels <= MAX_SAMPLES (checked by
  check_raster() on the size after JPEG draft, with the channels of the
  decoded mode or of the model input, whichever is more).
- JPEG (SOF, SOS and the markers between them, walked with a regex over the
  entropy-coded data): at most MAX_JPEG_SCANS scans; block visits (each scan
  costs libjpeg one step per 8x8 block of the components it codes) at most
  MAX_JPEG_BLOCK_VISITS; a multi-scan (progressive) file keeps every
  coefficient in memory: 64 per block, at most MAX_SAMPLES; at most
  MAX_MARKERS markers before the first scan, and at most MAX_JPEG_JUNK
  bytes of junk between them (Pillow's header parser skips junk one byte
  at a time in Python).
- PNG (IHDR and the chunk list): at most 4096 + one per 4 KiB of payload
  chunks (Pillow handles each in Python; encoders write 8-64 KiB IDATs); the
  inflated image data, height x (1 + row bytes), at most MAX_SAMPLES bytes,
  and past PNG_FREE_INFLATE at most PNG_MAX_RATIO times the payload (a
  photo inflates 2-3x, a screenshot 10-100x: only a nearly blank image of
  more than 8 MiB is refused, and it would cost up to 0.2 s here to
  decode); text and ICC chunks are capped through Pillow's own limits
  (preprocess).
- BMP (file and info header): uncompressed pixel data must be in the
  payload (Pillow would allocate the image first); RLE4/RLE8 may declare at
  most RLE_MAX_PIXELS_PER_BYTE pixels per byte of RLE data (a run codes at
  most 255 pixels in 2 bytes; the end-of-line and delta codes are what a
  bomb uses). Pillow's RLE decoder filled those pixel by pixel in Python;
  preprocess registers one that gives the same pixels in linear time.
- decoding itself: at most ``decode_cpu_s`` of the worker thread's CPU time
  (the worker sets sandbox.frame_timeout_s / 10), checked each time Pillow
  reads from the payload (every 16 KiB) and after the decode.

How a stream of bombs does not starve other streams: fast refusal. A bomb
of any kind above costs the worker 0.05-1.5 ms (tools/bench_bombs.py: the
issue's three 0.003-0.07 ms of CPU; through a sandboxed worker 0.05-0.14 ms
a round trip), about what a tiny frame costs, so the frames queued behind it
wait no longer than behind any frame, and the supervisor's round-robin over
streams hands the other streams their turns as before. Measured: a 20 fps
camera stream beside one bomb a second was 100% served with the same p99 (on
5f9c339: 3% served, p99 19 s). What passes every limit costs at most what its
size buys (a PNG inflates at most 128x past 8 MiB; a JPEG's work is bounded
by its blocks and scans) and never more than decode_cpu_s; such frames still
hold the one worker while they decode (a 1.1 MB PNG at the limits: 0.12 s),
which only a fairness by cost in the supervisor (or more workers) removes.
"""
from __future__ import annotations

import io
import re
import struct
import time
from dataclasses import dataclass

from edged.errors import FrameError

MAX_SIDE = 65_535              # JPEG's own limit; PNG and BMP declare up to 2**31
MAX_PIXELS = 40_000_000        # a 40 MP frame is already far past any camera edged serves
MAX_SAMPLES = 64 << 20         # pixels x channels of one raster: 21 MP RGB, 16 MP RGBA, 40 MP grey
MAX_JPEG_SCANS = 64            # libjpeg's progressive scripts write 10 (colour) or 6 (grey)
MAX_JPEG_BLOCK_VISITS = 8_000_000  # a 40 MP 4:2:0 JPEG in the standard 10 scans makes 3.8 M
MAX_MARKERS = 1024             # markers before the first scan: tables, APPn, COM
MAX_JPEG_JUNK = 4096           # bytes between header markers that are none (Pillow skips them one at a time)
RLE_MAX_PIXELS_PER_BYTE = 256
PNG_FREE_INFLATE = 8 << 20     # image data any PNG may inflate to (1080p RGBA), whatever its size
PNG_MAX_RATIO = 128            # past that, inflated bytes per payload byte (zlib reaches 1032)
READ_BLOCK = 16 << 10          # how much Pillow decodes between two budget checks


@dataclass(frozen=True)
class Declared:
    """What a frame's header says: size, channels of the decoded raster, and what was counted."""

    width: int
    height: int
    channels: int
    detail: str = ""


def inspect(payload: memoryview | bytes, kind: str) -> Declared:
    """Refuse a JPEG, PNG or BMP frame from its header and structure; what it declares when it passes."""
    buf = memoryview(payload).cast("B") if isinstance(payload, memoryview) else memoryview(payload)
    try:
        if kind == "jpeg":
            d = _jpeg(buf)
        elif kind == "png":
            d = _png(buf)
        elif kind == "bmp":
            d = _bmp(buf)
        else:
            raise ValueError(f"no header rules for {kind}")
    except (struct.error, IndexError):
        raise FrameError("bad_payload", f"cannot decode {kind}: header is truncated") from None
    _check_size(kind, d.width, d.height)
    return d


def check_raster(kind: str, width: int, height: int, channels: int) -> None:
    """The raster Pillow is about to hold: pixels x channels within MAX_SAMPLES."""
    _check_size(kind, width, height)
    if width * height * channels > MAX_SAMPLES:
        raise FrameError("too_large", f"{kind} image of {width}x{height} pixels x {channels} channels is over the "
                         f"decode budget of {MAX_SAMPLES} samples")


def _check_size(kind: str, w: int, h: int) -> None:
    if w <= 0 or h <= 0:
        raise FrameError("bad_payload", f"cannot decode {kind}: it declares {w}x{h} pixels")
    if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
        raise FrameError("too_large", f"{kind} image claims {w}x{h} pixels (limit {MAX_PIXELS}, "
                         f"{MAX_SIDE} a side)")


# -- JPEG -------------------------------------------------------------------------------------------

_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # not a stuffed 0xFF, a restart marker or fill
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}


def _jpeg(buf: memoryview) -> Declared:
    if bytes(buf[:2]) != b"\xff\xd8":
        raise FrameError("bad_payload", "cannot decode jpeg: no SOI marker")
    pos, n = 2, len(buf)
    markers = scans = visits = junk = 0
    frame: tuple[int, int, int, dict[int, int], bool] | None = None  # w, h, channels, blocks per id, progressive
    while pos < n:
        if scans == 0:  # in the header: markers back to back, 0xFF fill, a little junk (some cameras write it)
            if buf[pos] != 0xFF:
                skip = bytes(buf[pos:pos + MAX_JPEG_JUNK - junk + 1]).find(b"\xff")
                junk += len(buf) - pos if skip < 0 else skip
                if skip < 0 or junk > MAX_JPEG_JUNK:
                    raise FrameError("bad_payload", f"cannot decode jpeg: more than {MAX_JPEG_JUNK} bytes of junk "
                                     "between its header markers")
                pos += skip
            while pos + 1 < n and buf[pos + 1] == 0xFF:  # fill bytes count as junk: Pillow reads them one by one
                pos += 1
                junk += 1
                if junk > MAX_JPEG_JUNK:
                    raise FrameError("bad_payload", f"cannot decode jpeg: more than {MAX_JPEG_JUNK} bytes of fill "
                                     "or junk between its header markers")
            markers += 1
            if markers > MAX_MARKERS:
                raise FrameError("bad_payload", f"jpeg has more than {MAX_MARKERS} markers before its first scan")
        else:
            m = _NEXT_MARKER.search(buf, pos)
            if m is None:
                break  # truncated: Pillow says so
            pos = m.start()
        marker = buf[pos + 1]
        if marker == 0xD9:  # EOI
            break
        if marker in (0x01, *range(0xD0, 0xD8)):  # TEM, RSTn: no length
            pos += 2
            continue
        length = struct.unpack_from(">H", buf, pos + 2)[0]
        if length < 2:
            raise FrameError("bad_payload", f"cannot decode jpeg: marker length {length} at byte {pos}")
        body = buf[pos + 4:pos + 2 + length]
        if marker in _SOF:
            if frame is not None:
                raise FrameError("bad_payload", "cannot decode jpeg: more than one frame header")
            frame = _sof(body, marker in _PROGRESSIVE)
        elif marker == 0xDA:
            if frame is None:
                raise FrameError("bad_payload", "cannot decode jpeg: a scan before the frame header")
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise FrameError("bad_payload", f"jpeg has more than {MAX_JPEG_SCANS} scans")
            blocks = frame[3]
            visits += sum(blocks.get(body[1 + 2 * i], 0) for i in range(body[0]))
            if visits > MAX_JPEG_BLOCK_VISITS:
                raise FrameError("too_large", f"jpeg of {frame[0]}x{frame[1]} pixels in {scans}+ scans is over "
                                 f"the decode budget of {MAX_JPEG_BLOCK_VISITS} block visits")
        pos += 2 + length
    if frame is None:
        raise FrameError("bad_payload", "cannot decode jpeg: no frame header (SOF)")
    w, h, channels, blocks, progressive = frame
    if (progressive or scans > 1) and 64 * sum(blocks.values()) > MAX_SAMPLES:
        raise FrameError("too_large", f"{'progressive' if progressive else 'multi-scan'} jpeg of {w}x{h} pixels "
                         f"keeps {64 * sum(blocks.values())} coefficients (limit {MAX_SAMPLES})")
    return Declared(w, h, channels, f"{scans} scans, {visits} block visits")


def _sof(body: memoryview, progressive: bool) -> tuple[int, int, int, dict[int, int], bool]:
    _precision, h, w, nf = struct.unpack_from(">BHHB", body, 0)
    if h == 0:  # the height would come in a DNL marker, which libjpeg refuses anyway
        raise FrameError("bad_payload", "cannot decode jpeg: height 0 (DNL) is not supported")
    if not 1 <= nf <= 4:
        raise FrameError("bad_payload", f"cannot decode jpeg: {nf} components")
    _check_size("jpeg", w, h)
    comps = [(body[6 + 3 * i], body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15) for i in range(nf)]
    if any(not (1 <= hs <= 4 and 1 <= vs <= 4) for _c, hs, vs in comps):
        raise FrameError("bad_payload", "cannot decode jpeg: sampling factor outside 1..4")
    hmax, vmax = max(c[1] for c in comps), max(c[2] for c in comps)
    mcus_x, mcus_y = -(-w // (8 * hmax)), -(-h // (8 * vmax))
    blocks = {cid: mcus_x * hs * mcus_y * vs for cid, hs, vs in comps}
    return w, h, nf, blocks, progressive


# -- PNG --------------------------------------------------------------------------------------------

_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _png(buf: memoryview) -> Declared:
    n = len(buf)
    if bytes(buf[12:16]) != b"IHDR":
        raise FrameError("bad_payload", "cannot decode png: IHDR is not the first chunk")
    w, h, depth, colour = struct.unpack_from(">IIBB", buf, 16)
    if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise FrameError("bad_payload", f"cannot decode png: colour type {colour}, bit depth {depth}")
    _check_size("png", w, h)
    channels = _PNG_CHANNELS[colour]
    inflated = h * (1 + (w * channels * depth + 7) // 8)
    if inflated > MAX_SAMPLES:
        raise FrameError("too_large", f"png of {w}x{h} pixels inflates to {inflated} bytes (limit {MAX_SAMPLES})")
    if inflated > max(PNG_FREE_INFLATE, PNG_MAX_RATIO * n):
        raise FrameError("too_large", f"png of {n} bytes inflates to {inflated} bytes: over {PNG_MAX_RATIO} times "
                         f"its size (allowed up to {PNG_FREE_INFLATE} bytes)")
    limit = 4096 + n // 4096
    pos, chunks = 8, 0
    while pos + 8 <= n:
        length = struct.unpack_from(">I", buf, pos)[0]
        chunks += 1
        if chunks > limit:
            raise FrameError("bad_payload", f"png of {n} bytes has more than {limit} chunks")
        if bytes(buf[pos + 4:pos + 8]) == b"IEND":
            break
        pos += 12 + length
    return Declared(w, h, 3 if colour == 3 else channels, f"{chunks} chunks, {inflated} bytes inflated")


# -- BMP --------------------------------------------------------------------------------------------

def _bmp(buf: memoryview) -> Declared:
    n = len(buf)
    offset, hsize = struct.unpack_from("<II", buf, 10)
    if hsize == 12:  # OS/2 1.x BITMAPCOREHEADER
        w, h, _planes, bpp = struct.unpack_from("<HHHH", buf, 18)
        compression = 0
    elif hsize >= 16:
        w, h, _planes, bpp = struct.unpack_from("<iiHH", buf, 18)
        compression = struct.unpack_from("<I", buf, 30)[0] if hsize >= 20 else 0
    else:
        raise FrameError("bad_payload", f"cannot decode bmp: header size {hsize}")
    h = abs(h)  # negative: rows top-down
    _check_size("bmp", w, h)
    data = max(0, n - offset)
    if compression in (1, 2):  # RLE8, RLE4
        if w * h > RLE_MAX_PIXELS_PER_BYTE * max(data, 1):
            raise FrameError("too_large", f"RLE bmp of {data} bytes declares {w}x{h} pixels (limit "
                             f"{RLE_MAX_PIXELS_PER_BYTE} pixels a byte)")
    elif compression in (0, 3, 6) and bpp in (1, 2, 4, 8, 16, 24, 32):  # raw rows, BITFIELDS
        need = (w * bpp + 31) // 32 * 4 * h
        if need > data:
            raise FrameError("bad_payload", f"cannot decode bmp: {w}x{h} at {bpp} bits needs {need} bytes of "
                             f"pixels, the payload has {data}")
    return Declared(w, h, 4 if bpp == 32 else 3 if bpp > 8 else 1, f"compression {compression}, {bpp} bits")


# -- during decoding --------------------------------------------------------------------------------

class CpuBudget:
    """CPU time of the calling thread since start, against a limit (clock_gettime: allowed by the sandbox)."""

    def __init__(self, limit_s: float, kind: str) -> None:
        self.limit_s, self.kind = limit_s, kind
        self.start = time.thread_time()

    def spent(self) -> float:
        return time.thread_time() - self.start

    def check(self) -> None:
        spent = self.spent()
        if spent > self.limit_s:
            raise FrameError("too_large", f"{self.kind} image took more than its decode budget of "
                             f"{self.limit_s:.3g} s of CPU ({spent:.3g} s)")


class BudgetedReader(io.BytesIO):
    """The payload as Pillow reads it, checking the budget at each read.

    Pillow's decoders pull the data through read() in blocks of the image's
    ``decodermaxblock`` (preprocess sets READ_BLOCK); the pure-Python RLE
    decoder of BMP reads one or two bytes at a time.
    """

    def __init__(self, payload: memoryview | bytes, budget: CpuBudget) -> None:
        super().__init__(payload)
        self.budget = budget

    def read(self, size: int | None = -1) -> bytes:
        self.budget.check()
        return super().read(size)
