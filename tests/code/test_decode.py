"""The request decoder: every bad input gets a RequestError naming the problem and the image."""

from __future__ import annotations

import base64
import contextlib
import io
import struct
import zlib

import numpy as np
import pytest
from hostile_images import jpeg_with_scans, rle8_bmp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cars_ml.serving.decode import (
    Limits,
    RequestError,
    decode_base64_image,
    prepare_batch,
)

LIMITS = Limits()


def encode(image: Image.Image, fmt: str = "PNG", **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_header_only(width: int, height: int) -> str:
    """A PNG that claims huge dimensions: what a decompression bomb looks like to a header check."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
    return base64.b64encode(raw).decode("ascii")


def decode(value, **limits):
    opts = {"max_bytes": LIMITS.max_image_bytes, "max_pixels": LIMITS.max_pixels, **limits}
    return decode_base64_image(value, **opts)


def error_of(values, image_size: int = 8, limits: Limits = LIMITS) -> str:
    with pytest.raises(RequestError) as info:
        prepare_batch(values, image_size, limits)
    return str(info.value)


GOOD = encode(Image.new("RGB", (12, 10), (10, 200, 30)))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (5, "image 1: expected a base64-encoded image string, got int"),
        (None, "image 1: expected a base64-encoded image string, got NoneType"),
        (b"abcd", "image 1: expected a base64-encoded image string, got bytes"),
        ("", "image 1: empty image string"),
        ("   \n", "image 1: empty image string"),
        ("data:image/png;base64,", "image 1: empty image string"),
        ("not base64 at all!", "image 1: invalid base64"),
        ("abcde", "image 1: invalid base64"),
        (base64.b64encode(b"hello world").decode(), "image 1: not an image or an unsupported"),
        ("data:text/plain;base64,aGk=", "image 1: data URL has media type 'text/plain'"),
        ("data:image/png,rawbytes", "image 1: data URL is not base64-encoded"),
        (png_header_only(10_000, 10_000), "image 1: image is 10000x10000 = 100000000 pixels"),
    ],
)
def test_bad_value_is_refused_with_its_index(bad, message):
    assert message in error_of([GOOD, bad])


def test_unsupported_format_is_refused():
    tiff = encode(Image.new("RGB", (4, 4)), "TIFF")
    assert "not an image or an unsupported format" in error_of([tiff])


def test_truncated_jpeg_is_refused():
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    raw = base64.b64decode(encode(Image.fromarray(noise), "JPEG"))
    cut = base64.b64encode(raw[: len(raw) // 2]).decode()
    assert "image 0: truncated or corrupt image data" in error_of([cut])


def test_over_byte_limit_is_refused_before_decoding():
    limits = Limits(max_image_bytes=100)
    for size in (101, 102, 1000):
        big = base64.b64encode(bytes(size)).decode()
        expected = f"image 0: image is {size} bytes, over the limit of 100 bytes"
        assert expected in error_of([big], 8, limits)
        assert expected in error_of([big.rstrip("=")], 8, limits)
    # Exactly at the limit passes the byte check and fails later for what it is.
    assert "not an image" in error_of([base64.b64encode(bytes(100)).decode()], 8, limits)


def test_pil_decompression_bomb_error_becomes_request_error():
    # With our own limit lifted, PIL's guard (2x Image.MAX_IMAGE_PIXELS) still refuses it.
    with pytest.raises(RequestError, match="too large to decode safely"):
        decode(png_header_only(30_000, 30_000), max_pixels=10**12)


def test_request_level_limits():
    assert "empty request: no images" in error_of([])
    assert "too many images in one request: 3 > max_images_per_request=2" in error_of(
        [GOOD] * 3, 8, Limits(max_images_per_request=2)
    )
    assert "expected a list of base64 image strings, got str" in error_of(GOOD)


def test_batch_shape_dtype_and_colour():
    batch = prepare_batch([GOOD, "data:image/png;base64," + GOOD], 8, LIMITS)
    assert batch.shape == (2, 8, 8, 3) and batch.dtype == np.uint8
    assert np.abs(batch.astype(int) - [10, 200, 30]).max() <= 1


def test_url_safe_alphabet_and_missing_padding_are_accepted():
    noise = np.random.default_rng(1).integers(0, 255, (9, 9, 3), dtype=np.uint8)
    standard = encode(Image.fromarray(noise))
    url_safe = standard.replace("+", "-").replace("/", "_").rstrip("=")
    wrapped = "\n".join(standard[i : i + 76] for i in range(0, len(standard), 76))
    for value in (url_safe, wrapped):
        assert np.array_equal(np.asarray(decode(value)), noise)


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("L", (5, 5), 77), "PNG", (77, 77, 77)),
        (Image.new("L", (5, 5), 77), "JPEG", (77, 77, 77)),
        (Image.new("CMYK", (5, 5), (0, 0, 0, 0)), "JPEG", (255, 255, 255)),
        (Image.new("RGBA", (5, 5), (0, 0, 0, 0)), "PNG", (255, 255, 255)),
        (Image.new("RGBA", (5, 5), (0, 0, 255, 255)), "PNG", (0, 0, 255)),
        (Image.new("LA", (5, 5), (0, 0)), "PNG", (255, 255, 255)),
        (Image.new("1", (5, 5), 1), "PNG", (255, 255, 255)),
        (Image.new("RGB", (5, 5), (204, 0, 0)).convert("P"), "GIF", (204, 0, 0)),
        (Image.new("RGB", (5, 5), (0, 120, 0)), "BMP", (0, 120, 0)),
        (Image.new("RGB", (5, 5), (0, 120, 0)), "WEBP", (0, 120, 0)),
    ],
    ids=[
        "gray-png",
        "gray-jpeg",
        "cmyk",
        "transparent",
        "opaque-rgba",
        "la",
        "bilevel",
        "gif",
        "bmp",
        "webp",
    ],
)
def test_modes_become_rgb(image, fmt, expected):
    save = {"quality": 100, "lossless": True} if fmt == "WEBP" else {}
    decoded = decode(encode(image, fmt, **save))
    assert decoded.mode == "RGB"
    assert np.abs(np.asarray(decoded).astype(int) - expected).max() <= 3


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 1)
    decoded = np.asarray(decode(encode(image, "PNG", transparency=0)))
    assert tuple(decoded[1, 1]) == (255, 255, 255) and tuple(decoded[0, 0]) == (255, 0, 0)


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    image = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    decoded = np.asarray(decode(encode(image, "PNG")))
    assert np.abs(decoded.astype(int) - 128).max() <= 1


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = np.asarray(decode(encode(image, "JPEG", exif=exif.tobytes(), quality=95)))
    assert decoded.shape == (20, 10, 3)
    assert decoded[:8].mean() > 200 and decoded[12:].mean() < 50  # the white half is now on top


def _halves(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """Left half white, right half black (dark red for palette images)."""
    image = Image.new("RGB", (width, height), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, width // 2, height))
    return image.convert(mode) if mode != "RGB" else image


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_large_images_are_decoded_reduced_with_orientation_and_colours_kept(fmt):
    """Reduced decoding (JPEG draft, box reduce, nearest for palettes) keeps what the model
    sees: the short side stays >= 2x the target, the EXIF rotation still applies."""
    image = _halves(1200, 600)
    exif = Image.Exif()
    exif[0x0112] = 6
    save = {"exif": exif.tobytes()} if fmt in ("JPEG", "PNG", "WEBP") else {}
    decoded = decode(encode(image, fmt, **save), target_size=32)
    rotated = fmt != "GIF"
    width, height = decoded.size
    assert (width < height) == rotated, decoded.size
    assert 64 <= min(decoded.size) < 600, f"{decoded.size}: not reduced to >= 2x the 32 px target"
    pixels = np.asarray(decoded).astype(int)
    first, last = (pixels[:40], pixels[-40:]) if rotated else (pixels[:, :40], pixels[:, -40:])
    assert first.mean() > 200 and last.mean() < 60


def test_large_palette_sixteen_bit_and_transparent_images_keep_their_colours():
    palette = Image.new("P", (900, 900), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 900, 450))
    top = np.asarray(decode(encode(palette, "PNG", transparency=0), target_size=16)).astype(int)
    assert np.abs(top[2, 2] - (255, 0, 0)).max() <= 2 and np.abs(top[-2, -2] - 255).max() <= 2
    grey16 = Image.fromarray(np.full((700, 700), 32768, dtype=np.uint16))
    grey = np.asarray(decode(encode(grey16, "PNG"), target_size=16)).astype(int)
    assert np.abs(grey - 128).max() <= 1
    rgba = Image.new("RGBA", (800, 800), (0, 0, 255, 0))
    white = np.asarray(decode(encode(rgba, "PNG"), target_size=16)).astype(int)
    assert white.min() >= 253


SAMPLE_PNG = base64.b64decode(encode(Image.new("RGB", (6, 6), (1, 2, 3))))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_any_string_decodes_or_raises_request_error(text):
    with contextlib.suppress(RequestError):
        assert decode(text).mode == "RGB"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_request_error(raw):
    with contextlib.suppress(RequestError):
        decode(base64.b64encode(raw).decode())


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, len(SAMPLE_PNG) - 1),
    st.integers(0, 255),
    st.integers(1, len(SAMPLE_PNG)),
)
def test_mangled_png_decodes_or_raises_request_error(position, value, length):
    raw = bytearray(SAMPLE_PNG)
    raw[position] = value
    with contextlib.suppress(RequestError):
        decode(base64.b64encode(bytes(raw[:length])).decode())


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.one_of(st.text(max_size=20), st.integers(), st.none(), st.just(GOOD)), max_size=5)
)
def test_any_batch_returns_pixels_or_raises_request_error(values):
    try:
        batch = prepare_batch(values, 4, Limits(max_images_per_request=4))
    except RequestError as exc:
        assert str(exc)
    else:
        assert batch.shape == (len(values), 4, 4, 3)


def test_encodings_whose_work_is_not_bounded_by_their_pixels_are_refused():
    rle = base64.b64encode(rle8_bmp(2000, 2000)).decode()
    assert "run-length compressed BMP is not accepted" in error_of([GOOD, rle])
    # An uncompressed BMP decodes as before.
    bmp = encode(Image.new("RGB", (12, 10), (10, 200, 30)), "BMP")
    assert prepare_batch([bmp], 8, LIMITS).shape == (1, 8, 8, 3)
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), np.uint8))
    progressive = encode(photo, "JPEG", progressive=True)
    assert prepare_batch([progressive], 8, LIMITS).shape == (1, 8, 8, 3)
    many_scans = jpeg_with_scans(base64.b64decode(progressive), 40)
    message = error_of([base64.b64encode(many_scans).decode()])
    assert "image 0: JPEG with" in message and "more than 32" in message


def test_a_request_is_bounded_by_its_pixels_and_decoding_time():
    small = Limits(max_request_pixels=300)  # GOOD declares 120 pixels
    assert prepare_batch([GOOD, GOOD], 8, small).shape == (2, 8, 8, 3)
    message = error_of([GOOD] * 3, 8, small)
    assert message.startswith("image 2: ") and "max_request_pixels=300" in message
    assert "decode_time_s=1e-09" in error_of([GOOD] * 3, 8, Limits(decode_time_s=1e-9))
