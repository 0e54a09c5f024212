"""A corpus of hostile and malformed requests against a real ``mlflow models serve``.

Every case must get a 200 with a valid prediction or a 4xx with a clear message: never a 5xx,
and the server must keep serving. One server for the whole module (start-up costs ~10 s).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
from hostile_images import jpeg_with_scans, rle8_bmp
from PIL import Image
from served_model import (
    Served,
    assert_valid_prediction,
    b64,
    colour_png,
    encode,
    images_request,
    label_of,
    post,
    served_champion,
    solid_png,
)

pytestmark = pytest.mark.e2e

OK = "200"  # expected outcome: a valid prediction


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    with served_champion(tmp_path_factory.mktemp("hostile")) as server:
        yield server


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_header_claiming(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims ``width x height`` RGB pixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _png_chunk(b"IEND", b""))  # fmt: skip


def jpeg(image: Image.Image) -> bytes:
    return encode(image, "JPEG", quality=90)


RED = (220, 30, 30)
photo = Image.fromarray(
    np.clip(np.random.default_rng(1).normal(RED, 15, (48, 48, 3)), 0, 255).astype(np.uint8)
)
rgba = Image.new("RGBA", (40, 40), (*RED, 255))
rgba.putpixel((0, 0), (0, 0, 0, 0))
good_jpeg = jpeg(photo)
animated = io.BytesIO()
photo.save(animated, "GIF", save_all=True, append_images=[Image.new("RGB", (48, 48), (0, 0, 255))])
grey16 = Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16))
# ~2 MB of pixels a request may carry legitimately: a real 1500 x 1200 photo-sized image.
large_ok = encode(Image.new("RGB", (1500, 1200), RED), "JPEG")


def one(value) -> dict:
    return images_request([value])


@dataclass(frozen=True)
class Case:
    name: str
    body: object  # dict/list (sent as JSON), str or bytes (sent as is), or a callable making it
    expect: str  # OK, or a substring of the 4xx message
    content_type: str | None = "application/json"
    n: int = 1  # predictions expected for OK


# fmt: off
CASES = [
    # --- Bodies that are not the JSON the scoring protocol wants ---------------------------
    Case("empty body", b"", "valid JSON"),
    Case("whitespace body", b"  \n ", "valid JSON"),
    Case("not JSON", b"{image: nope", "valid JSON"),
    Case("invalid UTF-8 bytes", b'{"inputs": "\xff\xfe"}', "valid JSON"),
    Case("JSON list", [1, 2, 3], "Received a list"),
    Case("JSON number", b"5", "input must be a JSON dictionary"),
    Case("JSON string", b'"aGVsbG8="', "input must be a JSON dictionary"),
    Case("JSON null", b"null", "input must be a JSON dictionary"),
    Case("deeply nested JSON", b"[" * 100_000 + b"]" * 100_000, "too many JSON items"),
    Case("deep JSON inside inputs", b'{"inputs": {"image": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
         "too many JSON items"),
    Case("a huge integer", b'{"inputs": [' + b"7" * 100_000 + b"]}", "number too long"),
    Case("no format key", {"image": ["abc"]}, "exactly one of the input fields"),
    Case("two format keys", {"inputs": {"image": ["a"]}, "instances": [{"image": "a"}]},
         "exactly one of the input fields"),
    Case("inputs is a number", {"inputs": 5}, "got int"),
    Case("inputs is null", {"inputs": None}, "got NoneType"),
    Case("inputs is a string", {"inputs": "abc"}, "not an image"),
    Case("dataframe_split empty", {"dataframe_split": {}}, "must have 'data' field"),
    Case("dataframe_split without data", {"dataframe_split": {"columns": ["image"]}},
         "must have 'data' field"),
    Case("dataframe_records not a list", {"dataframe_records": 7}, "must be a list of records"),
    Case("nested dicts", {"inputs": {"image": {"a": {"b": {"c": 1}}}}}, "got dict"),
    Case("LLM chat shape", {"messages": [{"role": "user", "content": "hi"}]},
         "exactly one of the input fields"),
    Case("wrong column", {"dataframe_split": {"columns": ["img"], "data": [["x"]]}},
         "missing column 'image'"),
    Case("extra column", {"dataframe_split": {"columns": ["image", "x"], "data": [["a", 1]]}},
         "unexpected column(s) ['x']"),
    Case("params not allowed", {**one(b64(good_jpeg)), "params": {"top_k": "all"}}, OK),
    # --- Wrong types in the image column --------------------------------------------------
    Case("int image", one(5), "got int"),
    Case("null image", one(None), "image 0"),
    Case("float image", one(1.5), "got float"),
    Case("bool image", one(True), "got bool"),
    Case("list image", {"dataframe_records": [{"image": [1, 2]}]}, "image 0"),
    Case("dict image", {"dataframe_records": [{"image": {"a": 1}}]}, "image 0"),
    Case("empty string image", one(""), "empty image string"),
    # --- Bad image bytes -------------------------------------------------------------------
    Case("invalid base64", one("%%% not base64 %%%"), "invalid base64"),
    Case("base64 of one char", one("Q"), "invalid base64"),
    Case("truncated JPEG", one(b64(good_jpeg[: len(good_jpeg) // 2])), "truncated or corrupt"),
    Case("JPEG header only", one(b64(good_jpeg[:20])), "image 0"),
    Case("PDF bytes", one(b64(b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\n")), "not an image"),
    Case("ZIP bytes", one(b64(b"PK\x03\x04" + bytes(60))), "not an image"),
    Case("ELF bytes", one(b64(b"\x7fELF\x02\x01\x01" + bytes(60))), "not an image"),
    Case("SVG text", one(b64(b'<svg xmlns="http://www.w3.org/2000/svg"/>')), "not an image"),
    Case("TIFF (not an allowed format)", one(b64(encode(photo, "TIFF"))), "not an image"),
    Case("decompression bomb header 50000x50000", one(b64(png_header_claiming(50_000, 50_000))),
         "decompression bomb"),
    Case("bomb header 1 x 2**31-1", one(b64(png_header_claiming(1, 2**31 - 1))), "image 0"),
    Case("zero-size PNG header", one(b64(png_header_claiming(0, 0))), "image 0"),
    # --- Unusual but valid images: a prediction ------------------------------------------
    Case("good JPEG", one(b64(good_jpeg)), OK),
    Case("PNG with alpha", one(b64(encode(rgba))), OK),
    Case("palette PNG with transparency", one(b64(encode(rgba.convert("P")))), OK),
    Case("grayscale PNG", one(b64(encode(photo.convert("L")))), OK),
    Case("16-bit grayscale PNG", one(b64(encode(grey16))), OK),
    Case("1-bit PNG", one(b64(encode(photo.convert("1")))), OK),
    Case("CMYK JPEG", one(b64(jpeg(photo.convert("CMYK")))), OK),
    Case("1x1 pixel", one(b64(encode(Image.new("RGB", (1, 1), RED)))), OK),
    Case("1x4000 strip", one(b64(encode(Image.new("RGB", (1, 4000), RED)))), OK),
    Case("animated GIF", one(b64(animated.getvalue())), OK),
    Case("WEBP", one(b64(encode(photo, "WEBP"))), OK),
    Case("BMP", one(b64(encode(photo, "BMP"))), OK),
    Case("data URL", one("data:image/jpeg;base64," + b64(good_jpeg)), OK),
    Case("URL-safe base64 without padding", one(b64(good_jpeg).replace("+", "-").replace(
        "/", "_").rstrip("=")), OK),
    Case("1500x1200 photo-sized JPEG", one(b64(large_ok)), OK),
    # --- Decoding work: encodings whose cost is not bounded by their pixels, and requests
    # --- whose images together declare too many pixels ------------------------------------
    Case("run-length BMP", one(b64(rle8_bmp(6000, 6000))), "run-length compressed BMP"),
    Case("JPEG with 5000 scans", lambda: one(b64(jpeg_with_scans(good_jpeg, 5000))), "more than 32"),
    Case("progressive JPEG", one(b64(encode(photo, "JPEG", progressive=True))), OK),
    Case("three 36-megapixel images (108 MP in one request)",
         lambda: images_request([b64(encode(Image.new("1", (6000, 6000))))] * 3),
         "image 2: the request's images declare 108000000 pixels"),
    Case("instances format", {"instances": [{"image": b64(good_jpeg)}]}, OK),
    Case("inputs format", {"inputs": {"image": [b64(good_jpeg)] * 3}}, OK, n=3),
    # --- Size limits -------------------------------------------------------------------------
    Case("12 MB image in a body under the request limit", lambda: one(b64(bytes(12 * 2**20))),
         "over the limit of 10485760 bytes"),
    Case("30 MB body (over max_request_bytes)", lambda: one(b64(bytes(22 * 2**20))),
         "over the limit of 25165824 bytes (max_request_bytes)"),
    Case("one long and many empty strings (numpy would pad them all)",
         lambda: {"inputs": {"image": [b64(good_jpeg) * 2000] + [""] * 60_000}},
         "too many JSON items in one request: 60003 > 576 for max_images_per_request=64"),
    Case("instances of records", {"instances": [{"image": b64(good_jpeg)}] * 2}, OK, n=2),
    Case("dataframe_records", {"dataframe_records": [{"image": b64(good_jpeg)}]}, OK),
    Case("inputs as a plain list", {"inputs": [b64(good_jpeg)]}, OK),
    Case("3000 tiny images in one request", lambda: images_request([solid_png(RED, 4)] * 3000),
         "too many JSON items in one request: 6004 > 576 for max_images_per_request=64"),
    Case("64 images (the limit)", lambda: images_request([solid_png(RED, 8)] * 64), OK, n=64),
    Case("one bad image among good ones", images_request([b64(good_jpeg), "bad!"]), "image 1"),
    Case("empty image list", {"inputs": {"image": []}}, "empty request"),
    # --- Transport -------------------------------------------------------------------------
    Case("text/plain content type", json.dumps(one(b64(good_jpeg))), "content types",
         content_type="text/plain"),
    # Header variants MLflow's own parser would have taken, with no count check.
    *(Case(f"tiny items as {t}", lambda: b'{"inputs": [' + b",".join([b"[]"] * 500_000) + b"]}",
           "too many JSON items", content_type=t)
      for t in ("Application/Json", "application/json; charset=UTF-8", "application/json;charset=utf-8",
                "application/json; charset=utf-8; charset=utf-8", "application/json; format=x")),
    Case("many empty objects", lambda: b'{"inputs": [' + b",".join([b"{}"] * 1_000_000) + b"]}",
         "too many JSON items"),
    Case("CSV with 100000 rows", b"image\n" + b"QUJD\n" * 100_000,
         "too many images in one request: 100000 > ", content_type="TEXT/CSV; charset=utf-8"),
    Case("CSV image", lambda: "image\n" + b64(good_jpeg) + "\n", OK, content_type="text/csv"),
    Case("form body", b"image=abc", "is not accepted",
         content_type="application/x-www-form-urlencoded"),
    Case("utf-16 charset", json.dumps(one(b64(good_jpeg))), "UTF-8",
         content_type="application/json; charset=utf-8; charset=utf-16"),
    Case("latin-1 charset", json.dumps(one(b64(good_jpeg))), "UTF-8",
         content_type="application/json; charset=latin-1"),
    Case("CSV body of garbage", b"image\n%%%\n", "image 0", content_type="text/csv"),
    Case("parquet content type, garbage body", b"PAR1garbage", "Parquet",
         content_type="application/vnd.apache.parquet"),
]
# fmt: on


def _send(served: Served, case: Case):
    body = case.body() if callable(case.body) else case.body
    return post(served.port, body, content_type=case.content_type)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_request_gets_prediction_or_clear_4xx(served, case):
    reply = _send(served, case)
    assert reply.status < 500, f"{case.name}: {reply.status} {reply.text[:800]}"
    if case.expect == OK:
        assert_valid_prediction(reply, served.class_names, case.n)
    else:
        assert 400 <= reply.status < 500, f"{case.name}: {reply.status} {reply.text[:300]}"
        assert case.expect in reply.message, f"{case.name}: {reply.message[:800]}"
        # The reason is short and first, not buried after an echo of the (huge) request, and
        # the client gets no stack trace.
        assert len(reply.body) < 2000, f"{case.name}: error body of {len(reply.body)} bytes"
        assert "stack_trace" not in reply.text and "Traceback" not in reply.text, case.name
    assert served.alive(), f"server died on {case.name}"


def test_corpus_is_large_and_server_still_serves_correctly(served):
    assert len(CASES) >= 20
    # Run the whole corpus once more back to back, then a good request must still be right.
    for case in CASES:
        assert _send(served, case).status < 500, case.name
    value, label = colour_png(0)
    reply = post(served.port, images_request([value, solid_png(RED)]))
    assert_valid_prediction(reply, served.class_names, 2)
    assert label_of(reply) == [served.class_names[label], "red"]
    assert served.alive()


def test_missing_content_type_header_gets_415(served):
    """MLflow alone answers a request without Content-Type with 500 (``content_type.split`` on
    ``None``); ``cars_ml.serving.scoring_guard`` turns it into a 415 with a clear message."""
    reply = post(served.port, one(b64(good_jpeg)), content_type=None)
    assert reply.status == 415, (reply.status, reply.text[:300])
    assert "Content-Type" in reply.text
    assert served.alive()
    assert post(served.port, one(b64(good_jpeg))).status == 200


def _raw_exchange(port: int, head: bytes, chunks=(), timeout: float = 30) -> tuple[int, bytes]:
    """Send request ``head`` and then ``chunks`` as far as the server reads them; the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for chunk in chunks:
                sock.sendall(chunk)
        reply = b""
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                reply += data
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
    return status, reply


def _head(length: str | None, *extra: str) -> bytes:
    lines = ["POST /invocations HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"Content-Length: {length}"] if length is not None else []
    return ("\r\n".join([*lines, *extra, "Connection: close"]) + "\r\n\r\n").encode()


def test_body_over_request_limit_is_refused_before_it_is_read(served):
    """A 10 GB ``Content-Length`` gets a 413 at once: the server does not wait for the body."""
    status, reply = _raw_exchange(served.port, _head(str(10 * 2**30)))
    assert status == 413, reply[:300]
    assert b"max_request_bytes" in reply
    status, reply = _raw_exchange(served.port, _head(str(30 * 2**20), "Expect: 100-continue"))
    assert status == 413, reply[:300]
    assert served.alive()


def test_chunked_body_growing_past_the_limit_gets_413(served):
    """Without a length the gate counts while the body arrives and stops at the limit."""
    chunk = b"a" * 2**20
    frames = [*(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(40)), b"0\r\n\r\n"]
    status, reply = _raw_exchange(served.port, _head(None, "Transfer-Encoding: chunked"), frames)
    assert status == 413, reply[:300]
    assert b"max_request_bytes" in reply
    assert post(served.port, one(b64(good_jpeg))).status == 200


def _trickle_body(port: int, stop: threading.Event, statuses: list) -> None:
    """Announce a 1 MB body, then send a byte every half second until told to stop."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 60) as sock:
        sock.sendall(_head(str(2**20)))
        while not stop.wait(0.5):
            sock.sendall(b" ")
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            statuses.append(sock.recv(64)[:12])


def test_slow_bodies_do_not_hold_the_server(served):
    """Forty connections trickle their bodies (more than the server's slots and threads); a
    normal client keeps getting prompt answers meanwhile."""
    stop, statuses = threading.Event(), []
    slow = [
        threading.Thread(target=_trickle_body, args=(served.port, stop, statuses))
        for _ in range(40)
    ]
    for thread in slow:
        thread.start()
    try:
        time.sleep(1.0)
        waits = []
        for _ in range(20):
            start = time.perf_counter()
            reply = post(served.port, one(b64(good_jpeg)), timeout=30)
            waits.append(time.perf_counter() - start if reply.status == 200 else math.inf)
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in slow:
            thread.join(timeout=60)
    prompt = sum(wait < 5.0 for wait in waits)
    assert prompt >= 0.9 * len(waits), sorted(waits)
    assert served.alive()


def test_a_body_that_stops_arriving_gets_408(served):
    start = time.perf_counter()
    status, reply = _raw_exchange(served.port, _head("1000") + b'{"inputs": ', timeout=60)
    assert status == 408, reply[:300]
    assert b"body_idle_timeout_s=10" in reply
    assert time.perf_counter() - start < 20
