"""Unit tests of edged.preprocess: sniffing, decoding real images into real model inputs, the
quantisation rules of INTERFACE.md (uint8 raw, int8 p-128, float (p-mean)/std, NHWC and NCHW,
1 or 3 channels), and FrameError for every kind of bad payload, fuzzed."""
from __future__ import annotations

import io
import struct
import zlib

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from PIL import Image

from conftest import BUNDLED, DATA, shared
from edged.errors import FrameError
from edged.preprocess import Preprocessor, sniff
from edged.runtime import Model, TensorInfo

JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def info(shape: tuple[int, ...], dtype: str = "uint8") -> TensorInfo:
    return TensorInfo(0, "input", shape, dtype, 0.0, 0)


def fill(tinfo: TensorInfo, payload: bytes, content_type: str | None = None, **kw) -> tuple[str, np.ndarray]:
    dst = np.zeros(tinfo.shape, tinfo.dtype)
    kind = Preprocessor(tinfo, **kw).fill(dst, memoryview(payload), content_type)
    return kind, dst


def random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def mnv2_input() -> TensorInfo:
    return Model(str(shared("mobilenet_v2_1.0_224_quant.tflite"))).input


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    return Image.open(shared("cat.bmp")).convert("RGB")


@pytest.fixture(scope="module")
def sample_pixels() -> np.ndarray:
    img = Image.open(BUNDLED / "digits_sample.png")
    assert img.mode == "L" and img.size == (8, 8)
    return np.asarray(img, dtype=np.uint8)


# -- sniff ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("head, kind", [
    (JPEG_MAGIC + b"\xe0\x00\x10JFIF", "jpeg"),
    (PNG_MAGIC + b"\x00\x00\x00\rIHDR", "png"),
    (b"BM6\x00\x0c\x00", "bmp"),
    (b"GIF89a", None),
    (b"\xff\xd8", None),          # too short for the JPEG magic
    (b"\x89PNG", None),
    (b"", None),
    (b"\x00" * 64, None),
])
def test_sniff_magic_bytes_gives_kind(head, kind):
    assert sniff(memoryview(head)) == kind


@pytest.mark.parametrize("content_type, kind", [
    ("image/jpeg", "jpeg"), ("image/jpg", "jpeg"), ("IMAGE/PNG; charset=binary", "png"),
    ("image/bmp", "bmp"), ("image/x-ms-bmp", "bmp"), ("application/octet-stream", "raw"),
])
def test_sniff_content_type_overrides_magic(content_type, kind):
    assert sniff(memoryview(PNG_MAGIC + b"rest"), content_type) == kind


def test_sniff_unknown_content_type_falls_back_to_magic():
    assert sniff(memoryview(JPEG_MAGIC + b"rest"), "text/plain") == "jpeg"
    assert sniff(memoryview(b"plain"), "text/plain") is None


def test_fill_octet_stream_content_type_takes_image_bytes_as_raw(mnv2_input, cat):
    with pytest.raises(FrameError) as exc:
        fill(mnv2_input, encode(cat, "PNG"), "application/octet-stream")
    assert exc.value.code == "bad_payload" and "raw tensor" in exc.value.message


def test_fill_png_content_type_on_jpeg_bytes_raises_bad_payload(mnv2_input, cat):
    with pytest.raises(FrameError) as exc:
        fill(mnv2_input, encode(cat, "JPEG"), "image/png")
    assert exc.value.code == "bad_payload" and exc.value.message


# -- decode real images into the mobilenet v2 input ---------------------------------------------

@pytest.mark.parametrize("fmt", ["BMP", "PNG", "JPEG"])
def test_fill_cat_image_matches_pillow_reference(mnv2_input, cat, fmt):
    if fmt == "BMP":
        payload = shared("cat.bmp").read_bytes()
    else:
        payload = encode(cat, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    kind, dst = fill(mnv2_input, payload)
    assert kind == fmt.lower()
    assert dst.shape == (1, 224, 224, 3) and dst.dtype == np.uint8
    reference = Image.open(io.BytesIO(payload)).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)
    diff = np.abs(dst[0].astype(np.int16) - np.asarray(reference, dtype=np.int16))
    assert diff.mean() < 1.0 and diff.max() <= 8, (diff.mean(), diff.max())
    if fmt != "JPEG":  # lossless: the very same pixels as the canonical resize of the original
        canonical = np.asarray(cat.resize((224, 224), Image.Resampling.BILINEAR))
        np.testing.assert_array_equal(dst[0], canonical)


def test_fill_image_of_input_size_is_not_resized():
    pixels = random_rgb(6, 5)
    _, dst = fill(info((1, 6, 5, 3)), encode(Image.fromarray(pixels), "PNG"))
    np.testing.assert_array_equal(dst[0], pixels)


# -- colour modes ----------------------------------------------------------------------------------

def _modes_source() -> Image.Image:
    return Image.fromarray(random_rgb(6, 5, seed=3))


def test_fill_rgba_png_drops_alpha():
    rgb = random_rgb(6, 5, seed=4)
    alpha = np.random.default_rng(5).integers(0, 256, (6, 5, 1), dtype=np.uint8)
    payload = encode(Image.fromarray(np.concatenate([rgb, alpha], axis=2), "RGBA"), "PNG")
    _, dst = fill(info((1, 6, 5, 3)), payload)
    np.testing.assert_array_equal(dst[0], rgb)


@pytest.mark.parametrize("mode", ["L", "LA", "P"])
def test_fill_grey_or_palette_png_into_rgb_model_expands_channels(mode):
    img = _modes_source().convert(mode)
    _, dst = fill(info((1, 6, 5, 3)), encode(img, "PNG"))
    np.testing.assert_array_equal(dst[0], np.asarray(img.convert("RGB")))
    if mode != "P":
        assert (dst[0, ..., 0] == dst[0, ..., 1]).all() and (dst[0, ..., 1] == dst[0, ..., 2]).all()


@pytest.mark.parametrize("channels", [3, 1])
def test_fill_palette_png_with_alpha_entries_decodes(channels):
    rgba = np.concatenate([random_rgb(6, 5, seed=6), np.full((6, 5, 1), 128, np.uint8)], axis=2)
    payload = encode(Image.fromarray(rgba, "RGBA").convert("P"), "PNG")
    img = Image.open(io.BytesIO(payload))  # a palette PNG whose tRNS chunk holds per-entry alpha
    assert img.mode == "P" and isinstance(img.info.get("transparency"), bytes)
    _, dst = fill(info((1, 6, 5, channels)), payload)
    rgb = np.asarray(img.convert("RGBA"))[..., :3]
    expected = rgb if channels == 3 else (rgb.astype(np.uint16).sum(axis=2, keepdims=True) // 3).astype(np.uint8)
    np.testing.assert_array_equal(dst[0], expected)


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("L", "BMP"), ("L", "JPEG"), ("LA", "PNG")])
def test_fill_grey_image_into_grey_model_keeps_luminance(mode, fmt):
    img = _modes_source().convert(mode)
    payload = encode(img, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    _, dst = fill(info((1, 6, 5, 1)), payload)
    expected = np.asarray(Image.open(io.BytesIO(payload)).convert("L"))
    np.testing.assert_array_equal(dst[0, ..., 0], expected)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_fill_colour_image_into_grey_model_averages_rgb(mode):
    img = _modes_source().convert(mode)
    _, dst = fill(info((1, 6, 5, 1)), encode(img, "PNG"))
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint16)
    np.testing.assert_array_equal(dst[0, ..., 0], (rgb.sum(axis=2) // 3).astype(np.uint8))


def test_fill_digits_model_rgb_sample_classifiable_input(sample_pixels):
    """The bundled greyscale model fed an RGB copy of its sample sees the sample's own pixels."""
    digits = Model(str(BUNDLED / "digits.tflite")).input
    rgb = Image.fromarray(np.repeat(sample_pixels[..., None], 3, axis=2), "RGB")
    for fmt in ("PNG", "BMP"):
        _, dst = fill(digits, encode(rgb, fmt))
        np.testing.assert_array_equal(dst.reshape(8, 8), sample_pixels)


# -- input types and layouts -----------------------------------------------------------------------

def test_fill_nchw_float_fixture_gets_normalised_pixels(sample_pixels):
    model_in = Model(str(DATA / "digits_nchw_float.tflite")).input
    assert model_in.shape == (1, 1, 8, 8) and model_in.dtype == "float32"
    _, dst = fill(model_in, (BUNDLED / "digits_sample.png").read_bytes())
    expected = ((sample_pixels.astype(np.float32) - 127.5) / 127.5).reshape(1, 1, 8, 8)
    np.testing.assert_allclose(dst, expected, rtol=0, atol=1e-6)
    assert dst.min() >= -1.0 and dst.max() <= 1.0


def test_fill_nchw_float_three_channels_transposes():
    pixels = random_rgb(4, 5, seed=7)  # H != W, so a swapped transpose shows
    _, dst = fill(info((1, 3, 4, 5), "float32"), encode(Image.fromarray(pixels), "PNG"))
    expected = ((pixels.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(dst, expected, rtol=0, atol=1e-6)


def test_fill_nhwc_float_uses_configured_mean_and_std():
    pixels = random_rgb(4, 5, seed=8)
    _, dst = fill(info((1, 4, 5, 3), "float32"), encode(Image.fromarray(pixels), "PNG"), mean=0.0, std=255.0)
    np.testing.assert_allclose(dst[0], pixels / 255.0, rtol=0, atol=1e-6)


def test_fill_int8_fixture_gets_pixel_minus_128(sample_pixels):
    model_in = Model(str(DATA / "digits_int8io.tflite")).input
    assert model_in.dtype == "int8"
    _, dst = fill(model_in, (BUNDLED / "digits_sample.png").read_bytes())
    np.testing.assert_array_equal(dst.reshape(8, 8).astype(np.int16), sample_pixels.astype(np.int16) - 128)


def test_fill_uint8_three_channel_int8_input_full_range():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.repeat(pixels[..., None], 3, axis=2)
    _, dst = fill(info((1, 16, 16, 3), "int8"), encode(Image.fromarray(rgb), "BMP"))
    np.testing.assert_array_equal(dst[0].astype(np.int16), rgb.astype(np.int16) - 128)


def test_fill_non_image_input_with_image_raises_bad_payload():
    with pytest.raises(FrameError) as exc:
        fill(info((1, 4), "float32"), encode(_modes_source(), "PNG"))
    assert exc.value.code == "bad_payload" and "raw" in exc.value.message


# -- raw tensors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path, shape, dtype", [
    (DATA / "digits_float.tflite", (1, 8, 8, 1), "float32"),
    (DATA / "stateful.tflite", (1, 4), "float32"),
    (DATA / "digits_int8io.tflite", (1, 8, 8, 1), "int8"),
    (BUNDLED / "digits.tflite", (1, 8, 8, 1), "uint8"),
])
def test_fill_raw_tensor_of_exact_size_copied_byte_for_byte(path, shape, dtype):
    model_in = Model(str(path)).input
    assert (model_in.shape, model_in.dtype) == (shape, dtype)
    payload = b"\x00" + np.random.default_rng(9).bytes(model_in.nbytes - 1)  # \x00: no image magic
    for content_type in (None, "application/octet-stream"):
        kind, dst = fill(model_in, payload, content_type)
        assert kind == "raw" and dst.tobytes() == payload


def test_fill_raw_tensor_mnv2_size_copied_byte_for_byte(mnv2_input):
    payload = b"\x01" + np.random.default_rng(10).bytes(mnv2_input.nbytes - 1)
    kind, dst = fill(mnv2_input, payload)
    assert kind == "raw" and dst.tobytes() == payload


@pytest.mark.parametrize("head", [b"BM", JPEG_MAGIC])
def test_fill_raw_tensor_starting_with_image_magic_is_raw(mnv2_input, head):
    payload = head + np.random.default_rng(11).bytes(mnv2_input.nbytes - len(head))
    kind, dst = fill(mnv2_input, payload)
    assert kind == "raw" and dst.tobytes() == payload


# -- bad payloads ----------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    data = PNG_MAGIC + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        _png_chunk(b"IEND", b"")
    # the IHDR chunk is well-formed: only its dimensions are absurd
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    return data


def huge_bmp(cat_bmp: bytes, width: int, height: int) -> bytes:
    head = bytearray(cat_bmp[:54])
    struct.pack_into("<ii", head, 18, width, height)  # BITMAPINFOHEADER biWidth, biHeight
    return bytes(head) + cat_bmp[54:4096]


def bad_payloads(cat: Image.Image, cat_bmp: bytes) -> dict[str, tuple[bytes, str | None, str]]:
    jpeg, png = encode(cat, "JPEG"), encode(cat, "PNG")
    noise = b"\x00" + np.random.default_rng(12).bytes(4999)
    return {
        "raw_wrong_size": (bytes(1000), None, "bad_payload"),
        "raw_wrong_size_octet_stream": (bytes(1000), "application/octet-stream", "bad_payload"),
        "raw_one_byte_short": (bytes(224 * 224 * 3 - 1), None, "bad_payload"),
        "empty": (b"", None, "bad_payload"),
        "noise": (noise, None, "bad_payload"),
        "noise_as_png": (noise, "image/png", "bad_payload"),
        "jpeg_magic_only": (JPEG_MAGIC, None, "bad_payload"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], None, "bad_payload"),
        "truncated_jpeg_header": (jpeg[:200], None, "bad_payload"),
        "truncated_png": (png[: len(png) // 2], None, "bad_payload"),
        "png_with_garbage": (png[:100] + b"garbage!" * 200, None, "bad_payload"),
        "bmp_header_only": (cat_bmp[:54], None, "bad_payload"),
        "bmp_huge_dimensions": (huge_bmp(cat_bmp, 100_000, 100_000), None, "too_large"),
        "bmp_past_pixel_limit": (huge_bmp(cat_bmp, 7000, 7000), None, "too_large"),
        "png_100000x100000": (huge_png(), None, "too_large"),
    }


BAD = ["raw_wrong_size", "raw_wrong_size_octet_stream", "raw_one_byte_short", "empty", "noise", "noise_as_png",
       "jpeg_magic_only", "truncated_jpeg", "truncated_jpeg_header", "truncated_png", "png_with_garbage",
       "bmp_header_only", "bmp_huge_dimensions", "bmp_past_pixel_limit", "png_100000x100000"]


@pytest.mark.parametrize("name", BAD)
def test_fill_bad_payload_raises_frameerror_with_code(mnv2_input, cat, name):
    payload, content_type, code = bad_payloads(cat, shared("cat.bmp").read_bytes())[name]
    dst = np.full(mnv2_input.shape, 7, np.uint8)
    with pytest.raises(FrameError) as exc:
        Preprocessor(mnv2_input).fill(dst, memoryview(payload), content_type)
    assert exc.value.code == code, exc.value.message
    assert exc.value.message.strip() and "\n" not in exc.value.message


def test_fill_oversized_frames_raise_before_decoding_pixels(mnv2_input, cat):
    """Huge claimed dimensions are refused from the header: fast, no giant allocation."""
    import time

    payloads = bad_payloads(cat, shared("cat.bmp").read_bytes())
    start = time.monotonic()
    for name in ("bmp_huge_dimensions", "png_100000x100000", "bmp_past_pixel_limit"):
        with pytest.raises(FrameError):
            fill(mnv2_input, payloads[name][0])
    assert time.monotonic() - start < 1.0


# -- fuzz ------------------------------------------------------------------------------------------

def _seeds() -> list[bytes]:
    img = Image.fromarray(random_rgb(24, 32, seed=13))
    return [encode(img, "JPEG"), encode(img, "JPEG", progressive=True), encode(img.convert("L"), "JPEG"),
            encode(img, "PNG"), encode(img.convert("RGBA"), "PNG"), encode(img.convert("P"), "PNG"),
            encode(img.convert("L"), "PNG"), encode(img, "BMP"), encode(img.convert("P"), "BMP"),
            encode(img.convert("1"), "BMP")]


SEEDS = _seeds()
TARGETS = [info((1, 16, 16, 3)), info((1, 1, 8, 8), "float32"), info((1, 8, 8, 1), "int8"),
           info((1, 3, 12, 10), "float32")]
CONTENT_TYPES = [None, None, None, "image/jpeg", "image/png", "image/bmp", "application/octet-stream"]
FUZZ = settings(max_examples=2500, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("int32"), st.integers(0, 1 << 20),
              st.sampled_from([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0x80000000, 100_000, 65535])),
)


def mutate(seed: bytes, ops: list[tuple]) -> bytes:
    data = bytearray(seed)
    for op, pos, arg in ops:
        i = pos % (len(data) + 1)
        if op == "flip" and data:
            data[i % len(data)] ^= arg
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = arg
        elif op == "int32":
            data[i : i + 4] = struct.pack("<I", arg)
    return bytes(data)


def _fill_or_frameerror(target: TensorInfo, payload: bytes, content_type: str | None) -> None:
    dst = np.zeros(target.shape, target.dtype)
    try:
        Preprocessor(target).fill(dst, memoryview(payload), content_type)
    except FrameError as exc:
        assert exc.code in ("bad_payload", "too_large") and exc.message.strip()


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(mutation, min_size=1, max_size=4), st.sampled_from(TARGETS),
       st.sampled_from(CONTENT_TYPES))
def test_fill_mutated_images_raise_only_frameerror(seed, ops, target, content_type):
    _fill_or_frameerror(target, mutate(seed, ops), content_type)


@settings(FUZZ, max_examples=1000)
@given(st.one_of(st.binary(max_size=2048),
                 st.tuples(st.sampled_from([JPEG_MAGIC, PNG_MAGIC, b"BM"]), st.binary(max_size=2048))
                 .map(lambda t: t[0] + t[1])),
       st.sampled_from(TARGETS), st.sampled_from(CONTENT_TYPES))
def test_fill_random_bytes_raise_only_frameerror(payload, target, content_type):
    _fill_or_frameerror(target, payload, content_type)
