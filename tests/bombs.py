"""Decoder bombs for tests and tools/bench_bombs.py: small payloads whose headers or structure make
a decoder spend seconds or hundreds of MiB (issue 17). Each builder is deterministic."""
from __future__ import annotations

import io
import random
import struct
import zlib

from PIL import Image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rle8_bmp(width: int = 40_000_000, height: int = 1) -> bytes:
    """An RLE8 BMP of ~1 KB declaring width x height: one short run, end of line, end of bitmap.

    Pillow's RLE decoder pads the rest of the row one byte at a time in Python
    (40,000,000x1: 10.9 s and 911 MiB on 5f9c339)."""
    palette = b"".join(struct.pack("<BBBB", i, i, i, 0) for i in range(256))
    rle = b"\x02\x07" + b"\x00\x00" + b"\x00\x01"  # 2 pixels of index 7, end of line, end of bitmap
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rle), 2835, 2835, 256, 0)
    head = b"BM" + struct.pack("<IHHI", offset + len(rle), 0, 0, offset)
    return head + info + palette + rle


def _segments(jpeg: bytes) -> list[bytes]:
    """A JPEG cut into marker segments; each SOS segment keeps its entropy-coded data."""
    out, pos = [], 2
    while pos < len(jpeg):
        assert jpeg[pos] == 0xFF, pos
        marker = jpeg[pos + 1]
        if marker == 0xD9:
            out.append(jpeg[pos:pos + 2])
            break
        length = struct.unpack(">H", jpeg[pos + 2:pos + 4])[0]
        end = pos + 2 + length
        if marker == 0xDA:  # entropy-coded data runs to the next marker that is not a stuffed byte or RST
            while not (jpeg[end] == 0xFF and jpeg[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        out.append(jpeg[pos:end])
        pos = end
    return out


def progressive_jpeg(scans: int = 3000, size: tuple[int, int] = (6000, 6000)) -> bytes:
    """A progressive JPEG whose cheapest AC scan (with the Huffman table before it) is repeated until
    the file has `scans` scans. libjpeg decodes every repeat over the whole image (3,000 scans: 104 s
    on 5f9c339). The default, 36 MP grey, gives ~0.3 MB."""
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, "JPEG", progressive=True, quality=90)
    segs = _segments(buf.getvalue())
    sos = [i for i, s in enumerate(segs) if s[1] == 0xDA]
    # a scan and the DHT segments right before it form one unit that decodes on its own
    units = []
    for i in sos:
        j = i
        while segs[j - 1][1] == 0xC4:
            j -= 1
        units.append(b"".join(segs[j:i + 1]))
    ac = [u for u, i in zip(units, sos) if segs[i][5 + 2 * segs[i][4]] != 0]  # spectral start Ss > 0
    cheapest = min(ac or units, key=len)
    head = b"\xff\xd8" + b"".join(s for s in segs[:sos[0]] if s[1] != 0xC4)
    body = b"".join(units)
    extra = max(0, scans - len(sos))
    return head + body + cheapest * extra + b"\xff\xd9"


def png_zeros(width: int = 8000, height: int = 5000, colour_type: int = 2, bit_depth: int = 8,
              idat_chunk: int = 1 << 16, noise: bool = False) -> bytes:
    """A PNG of all-zero rows (filter 0): 8000x5000 RGB is 40 MP in ~115 KB (900 MiB in a worker on 5f9c339).

    noise: one row of random bytes every 64 rows, so the payload is ~1/64 of the image data."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour_type]
    size = (width * channels * bit_depth + 7) // 8
    row = b"\x00" * (1 + size)
    rng = random.Random(17)
    z = zlib.compressobj(9)
    parts = [z.compress(b"\x00" + rng.randbytes(size) if noise and y % 64 == 0 else row) for y in range(height)]
    data = b"".join(parts) + z.flush()
    out = [PNG_MAGIC, chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))]
    if colour_type == 3:
        out.append(chunk(b"PLTE", bytes(range(256)) * 3))
    out += [chunk(b"IDAT", data[i:i + idat_chunk]) for i in range(0, len(data), idat_chunk)]
    out.append(chunk(b"IEND", b""))
    return b"".join(out)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_many_chunks(chunks: int = 200_000) -> bytes:
    """A valid 16x16 PNG with `chunks` empty private ancillary chunks before IDAT (Pillow walks each in Python)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "PNG")
    png = buf.getvalue()
    idat = png.index(b"IDAT") - 4
    return png[:idat] + chunk(b"edGd", b"") * chunks + png[idat:]


def png_text_bomb(count: int = 64) -> bytes:
    """A 16x16 PNG with `count` zTXt chunks that each inflate to 1 MiB (Pillow's own caps: 1 MiB each, 64 MiB)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "PNG")
    png = buf.getvalue()
    idat = png.index(b"IDAT") - 4
    text = chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"\x00" * ((1 << 20) - 1024), 9))
    return png[:idat] + text * count + png[idat:]


def jpeg_junk_before_sos(junk: int = 4 << 20) -> bytes:
    """A small JPEG with `junk` bytes of garbage between two header markers (Pillow skips them byte by byte)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    pos = jpeg.index(b"\xff\xdb")  # before the first DQT
    return jpeg[:pos] + b"\x00" * junk + jpeg[pos:]
