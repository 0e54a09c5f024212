"""The device's peak float32 and int8 throughput, on fixed fully-connected probes.

The probes in ``probes/`` (``dense_float32.tflite``, ``dense_int8.tflite``; shape in
``shape.json``: batch 256, 256 inputs x 256 units) were made once with
``cars_ml.measure.peaks.dense_tflite`` by ``make_probes.py``. GMAC/s is
``batch * inputs * units / median seconds of one invoke / 1e9``.

Usable without the CLI, on the training host too: ``peak_gmacs(threads)`` returns
``{"peak_float32_gmacs": ..., "peak_int8_gmacs": ...}``; ``probe_path(precision)`` gives the file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from cars_ml_edge.measure import interpreter

PROBES = Path(__file__).resolve().parent / "probes"
PRECISIONS = ("float32", "int8")


def probe_path(precision: str) -> Path:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return PROBES / f"dense_{precision}.tflite"


def probe_macs() -> int:
    """Multiply-adds of one probe invoke."""
    shape = json.loads((PROBES / "shape.json").read_text())
    return shape["batch"] * shape["inputs"] * shape["units"]


def _median_s(content: bytes, threads: int, runs: int, warmup: int) -> float:
    interp = interpreter(content, threads)
    detail = interp.get_input_details()[0]
    rng = np.random.default_rng(0)
    if np.dtype(detail["dtype"]) == np.float32:
        value = rng.uniform(-1, 1, detail["shape"]).astype(np.float32)
    else:
        value = rng.integers(-100, 100, detail["shape"]).astype(detail["dtype"])
    interp.set_tensor(detail["index"], value)
    for _ in range(warmup):
        interp.invoke()
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        interp.invoke()
        times[i] = time.perf_counter() - start
    return float(np.median(times))


def peak_gmacs(threads: int, *, runs: int = 100, warmup: int = 5) -> dict[str, float]:
    """``{"peak_float32_gmacs", "peak_int8_gmacs"}`` of this machine at ``threads`` threads."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    macs = probe_macs()
    return {
        f"peak_{precision}_gmacs": macs
        / _median_s(probe_path(precision).read_bytes(), threads, runs, warmup)
        / 1e9
        for precision in PRECISIONS
    }


def profile_metrics(threads: list[int], **kwargs) -> dict[str, float]:
    """The device profile's metrics: ``peak_<P>_gmacs_t<T>`` for each thread count and the
    un-suffixed ``peak_<P>_gmacs`` of the first."""
    metrics: dict[str, float] = {}
    for i, count in enumerate(threads):
        peaks = peak_gmacs(count, **kwargs)
        metrics.update({f"{key}_t{count}": value for key, value in peaks.items()})
        if i == 0:
            metrics.update(peaks)
    return metrics
