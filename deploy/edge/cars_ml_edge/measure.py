"""Pure measurement: TFLite flatbuffer bytes in, numbers out (no MLflow, no files).

Load time is the interpreter's construction plus ``allocate_tensors``; latency is one batch-1
``invoke`` after the input is set, over ``runs`` timed runs after ``warmup`` untimed ones. Peak
memory is this process's resident high-water mark (VmHWM), reset before loading where the
kernel allows it, so it covers the interpreter, its tensors and the Python process around it.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Sequence

import numpy as np

# Imported here, not on first use, so that no load time includes loading the runtime itself.
from ai_edge_litert.interpreter import Interpreter


def interpreter(content: bytes, threads: int):
    """A LiteRT interpreter on ``content`` with its tensors allocated."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    interp = Interpreter(model_content=content, num_threads=threads)
    interp.allocate_tensors()
    return interp


def to_input(pixels: np.ndarray, detail: dict) -> np.ndarray:
    """uint8 RGB pixels as the input tensor wants them: float32 pixels for a float file,
    quantized with the tensor's scale and zero point for an integer one."""
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return pixels.astype(np.float32)
    scale, zero = detail["quantization"]
    if scale == 0:  # An integer input without quantization takes the pixels as they are.
        return pixels.astype(dtype)
    info = np.iinfo(dtype)
    quantized = np.round(pixels.astype(np.float32) / scale + zero)
    return np.clip(quantized, info.min, info.max).astype(dtype)


def input_size(content: bytes) -> tuple[int, int]:
    """(height, width) of the model's image input, from its input tensor's shape."""
    shape = interpreter(content, 1).get_input_details()[0]["shape"]
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"expected an image input (1, h, w, 3), got shape {list(shape)}")
    return int(shape[1]), int(shape[2])


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0); elsewhere the
    # peak stays the process's lifetime peak, an upper bound.
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """This process's resident high-water mark in MB (VmHWM, else ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # macOS reports bytes, Linux kilobytes.
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


def latency(content: bytes, threads: int, *, runs: int = 50, warmup: int = 5, seed: int = 0):
    """Load time, batch-1 latency percentiles and peak memory of one flatbuffer.

    Returns ``{"load_ms", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99",
    "peak_rss_mb"}``. The input is random uint8 pixels, quantized as the file's input wants.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    _reset_peak()
    start = time.perf_counter()
    interp = interpreter(content, threads)
    load_ms = (time.perf_counter() - start) * 1000.0
    detail = interp.get_input_details()[0]
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, detail["shape"], dtype=np.uint8)
    interp.set_tensor(detail["index"], to_input(pixels, detail))
    for _ in range(warmup):
        interp.invoke()
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        interp.invoke()
        times[i] = (time.perf_counter() - start) * 1000.0
    p50, p95, p99 = np.percentile(times, [50, 95, 99])
    return {
        "load_ms": load_ms,
        "latency_ms_p50": float(p50),
        "latency_ms_p95": float(p95),
        "latency_ms_p99": float(p99),
        "peak_rss_mb": peak_rss_mb(),
    }


def top1(content: bytes, images: Sequence[np.ndarray]) -> np.ndarray:
    """The top-1 class of each uint8 ``(h, w, 3)`` image, one batch-1 invoke per image."""
    interp = interpreter(content, 1)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    classes = np.empty(len(images), dtype=np.int64)
    for i, image in enumerate(images):
        interp.set_tensor(inp["index"], to_input(np.asarray(image)[None], inp))
        interp.invoke()
        # Dequantizing is monotonic (scale > 0), so the argmax of the raw output is the top-1.
        classes[i] = int(np.argmax(interp.get_tensor(out["index"])[0]))
    return classes


def agreement(float_content: bytes, int8_content: bytes, images: Sequence[np.ndarray]) -> float:
    """Share of ``images`` whose int8 top-1 class equals the float32 file's."""
    if len(images) == 0:
        raise ValueError("agreement needs at least one image")
    return float(np.mean(top1(float_content, images) == top1(int8_content, images)))
