"""Image files whose decoding costs far more than their size: shared by the decoder's unit tests
and the hostile-request corpus against a real server."""

from __future__ import annotations

import struct


def rle8_bmp(width: int, height: int) -> bytes:
    """A run-length (RLE8) BMP: a few kB that Pillow would decode in a Python loop."""
    row = b"\xff\x01" * (width // 255) + b"\x00\x00"
    rows = row * height + b"\x00\x01"
    offset = 14 + 40 + 256 * 4
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(rows), 0, 0, 256, 0)
    header = b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset)
    return header + info + bytes(256 * 4) + rows


def jpeg_with_scans(raw: bytes, extra: int) -> bytes:
    """The JPEG file ``raw`` with ``extra`` more scan headers (SOS markers) before its end."""
    return raw[:-2] + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" * extra + raw[-2:]
