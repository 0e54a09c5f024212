"""The served champion's memory stays within its budget under concurrent near-limit requests.

Eight clients send, at once and over and over, images at the limits of every accepted kind
(40-megapixel JPEG, RGBA, 16-bit grey, palette-with-transparency PNG, WEBP and GIF, a BMP at the
10 MiB file limit) and the request shape that makes MLflow pad numpy strings (one large image
among 63 small ones, as ``inputs``). The resident memory of the server's process tree is sampled
throughout; its peak above idle must stay under ``BUDGET_MB`` (docs/serving.md states it).
"""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from served_model import Served, b64, images_request, post, served_champion, solid_png, tree_rss_mb

pytestmark = pytest.mark.e2e

BUDGET_MB = 1024
CLIENTS = 8
ROUNDS = 2
MEGAPIXELS_40 = (7300, 5470)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    with served_champion(tmp_path_factory.mktemp("memory")) as server:
        yield server


def _encode(image: Image.Image, fmt: str, **options) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    raw = buffer.getvalue()
    assert len(raw) <= 10 * 2**20, f"{fmt} test image of {len(raw)} bytes is over the limit"
    return b64(raw)


def _near_limit_images() -> dict[str, str]:
    """One base64 image per accepted kind, each as large as the limits let it be."""
    width, height = MEGAPIXELS_40
    ramp = np.linspace(0, 255, width, dtype=np.float32)
    grey = np.broadcast_to(ramp.astype(np.uint8), (height, width))
    rgb = Image.fromarray(np.stack([grey, grey[:, ::-1], np.full_like(grey, 90)], axis=-1))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.ascontiguousarray(grey)))
    palette = rgb.quantize(16)
    palette.info["transparency"] = 0
    grey16 = Image.fromarray(grey.astype(np.uint16) * 257)
    images = {
        "jpeg 40 MP": _encode(rgb, "JPEG", quality=80),
        "png rgba 40 MP": _encode(rgba, "PNG", compress_level=1),
        "png 16-bit grey 40 MP": _encode(grey16, "PNG", compress_level=1),
        "png palette+transparency 40 MP": _encode(palette, "PNG", transparency=0),
        "gif 40 MP": _encode(palette, "GIF"),
        "webp 16383 x 2441": _encode(rgb.resize((16383, 2441)), "WEBP", quality=50),
        "bmp at 10 MiB": _encode(rgb.resize((1900, 1800)), "BMP"),
    }
    return images


def _requests() -> dict[str, dict]:
    images = _near_limit_images()
    bodies = {name: images_request([value]) for name, value in images.items()}
    # MLflow alone pads all 64 strings to the longest one: 64 x 13 MB x 4 bytes.
    bodies["inputs: one large among 63 small"] = {
        "inputs": {"image": [images["jpeg 40 MP"]] + [solid_png((200, 20, 20), 8)] * 63}
    }
    return bodies


def test_memory_stays_within_budget_under_concurrent_near_limit_requests(served):
    bodies = _requests()
    time.sleep(1)
    idle_mb = tree_rss_mb(served.pid)
    peak = {"mb": idle_mb}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["mb"] = max(peak["mb"], tree_rss_mb(served.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    jobs = [(name, body) for _ in range(ROUNDS) for name, body in bodies.items()]
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            replies = list(pool.map(lambda job: (job[0], post(served.port, job[1])), jobs))
    finally:
        done.set()
        sampler.join()
    elapsed = time.perf_counter() - started
    growth = peak["mb"] - idle_mb
    print(
        f"\nserver memory: idle {idle_mb:.0f} MB, peak {peak['mb']:.0f} MB, growth {growth:.0f} MB"
        f" (budget {BUDGET_MB} MB); {len(jobs)} near-limit requests by {CLIENTS} clients in "
        f"{elapsed:.1f} s"
    )
    for name, reply in replies:
        assert reply.status == 200, (name, reply.status, reply.text[:300])
    assert growth < BUDGET_MB, f"server grew by {growth:.0f} MB, over the {BUDGET_MB} MB budget"
    assert served.alive()
