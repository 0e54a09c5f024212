"""Edge: LiteRT int8 vs float32 at one thread, each against its compute floor on this core.

The floor of a precision is the model's multiply-adds divided by the peak rate the same runtime
reaches in that precision on the same core, measured in the same run on a large fully-connected
layer (dense matrix multiplication is what these kernels do best). ``latency / floor`` says how
much of the remaining time is overhead and memory traffic rather than arithmetic.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from cars_ml.export.tflite import LiteRTRunner, export_tflite
from cars_ml.measure.macs import count_macs
from cars_ml.measure.peaks import THREADS, Invoker, dense_tflite, host_peak_gmacs
from cars_ml.measure.timing import interleaved_medians

# (batch, inputs, units): the example of issue 7, and a shape whose float weights (4 MB) stay
# in this core's caches and so reached the highest rate here; the peak is the better of the two.
PEAK_SHAPES = ((64, 1024, 4096), (256, 1024, 1024))


def compare_edge(
    model,
    image: np.ndarray,
    representative: np.ndarray,
    workdir: Path,
    *,
    runs: int = 100,
    warmup: int = 10,
    peak_shapes: tuple[tuple[int, int, int], ...] = PEAK_SHAPES,
) -> dict[str, float]:
    """Export ``model`` to LiteRT float32 and int8 and time both, and both peaks, side by side.

    ``image`` is one uint8 ``(s, s, 3)`` photo; ``representative`` calibrates int8. Latency is
    the product's ``LiteRTRunner.predict`` (quantize, invoke, dequantize), as the train step
    logs it. ``peak_shapes`` are (batch, inputs, units) of fully-connected probes; the peak of
    a precision is the best rate among them.
    """
    paths = export_tflite(model, Path(workdir) / "tflite", representative)
    one = np.asarray(image)[None]
    float_runner = LiteRTRunner(paths["float32"], num_threads=THREADS)
    int8_runner = LiteRTRunner(paths["int8"], num_threads=THREADS)
    contenders = {
        "float32": lambda: float_runner.predict(one),
        "int8": lambda: int8_runner.predict(one),
    }
    for i, shape in enumerate(peak_shapes):
        contenders[f"peak{i}_float32"] = Invoker(dense_tflite(*shape, int8=False), THREADS)
        contenders[f"peak{i}_int8"] = Invoker(dense_tflite(*shape, int8=True), THREADS)
    medians = interleaved_medians(contenders, runs=runs, warmup=warmup)

    def peak(precision: str) -> float:
        rates = [
            math.prod(shape) / (medians[f"peak{i}_{precision}"] / 1000.0) / 1e9
            for i, shape in enumerate(peak_shapes)
        ]
        return max(rates)

    macs = count_macs(model)
    estimates = compare_estimates(paths, medians, runs=runs)
    peak_f, peak_q = peak("float32"), peak("int8")
    floor_f_ms = macs / (peak_f * 1e9) * 1000.0
    floor_q_ms = macs / (peak_q * 1e9) * 1000.0
    return {
        "tflite_float32_ms": medians["float32"],
        "tflite_int8_ms": medians["int8"],
        "int8_speedup_vs_float": medians["float32"] / medians["int8"],
        "model_macs": float(macs),
        "peak_float32_gmacs": peak_f,
        "peak_int8_gmacs": peak_q,
        "float_floor_ms": floor_f_ms,
        "int8_floor_ms": floor_q_ms,
        "float_latency_over_floor": medians["float32"] / floor_f_ms,
        "int8_latency_over_floor": medians["int8"] / floor_q_ms,
        **estimates,
    }


# Simulated devices: this host pinned to some of its cores, measured as the edge agent would.
SIMULATED_DEVICES = {"sim-1core": ("0", 1), "sim-2core": ("0,1", 2)}


def compare_estimates(
    paths: dict[str, Path], host_ms: dict[str, float], runs: int = 50
) -> dict[str, float]:
    """Latency estimates from device profiles (``measure/estimate.py``) against measurements on
    simulated devices (this host under ``taskset``), for both files.

    ``host_ms`` holds the one-thread medians of both files measured here; the estimate scales
    them by this host's one-thread probe peak over the device's peak at its thread count, as a
    train run does for a calibrated device. Devices this host cannot simulate (too few cores,
    no ``taskset``) are left out.
    """
    import os
    import shutil
    import subprocess
    import sys

    from cars_ml.measure.estimate import estimate_latencies

    if shutil.which("taskset") is None:
        return {}
    host = {f"tflite_{p}_latency_ms_p50": host_ms[p] for p in ("float32", "int8")}
    host.update(host_peak_gmacs(THREADS))
    out: dict[str, float] = {}
    for device, (cores, threads) in SIMULATED_DEVICES.items():
        if threads > (os.cpu_count() or 1):
            continue
        command = ["taskset", "-c", cores, sys.executable, "-m", "cars_ml.perf.device_sim"]
        command += ["--threads", str(threads), "--runs", str(runs)]
        result = subprocess.run(
            [*command, str(paths["float32"]), str(paths["int8"])],
            capture_output=True,
            text=True,
            check=True,
        )
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        profile = {p: measured[f"host_peak_{p}_gmacs"] for p in ("float32", "int8")}
        for name, value in estimate_latencies(host, {device: profile}).items():
            precision = name.split("_")[-3]
            out[name] = value
            out[f"measured_{device}_{precision}_latency_ms"] = measured[f"{precision}_ms"]
            out[f"est_over_measured_{device}_{precision}"] = value / measured[f"{precision}_ms"]
    return out
