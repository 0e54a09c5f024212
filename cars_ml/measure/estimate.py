"""Latency estimates for devices the platform has a profile of but cannot measure on.

A device profile (written by the edge agent, ``cars-ml-edge --calibrate``) holds the device's peak
float32 and int8 multiply-add rates on fixed fully-connected probes. The same probes run on the
training host at the thread count of the host's latency measurement. A model's latency on the
device is then estimated as its measured host latency scaled by the two peaks:

    est_<device>_<P>_latency_ms = tflite_<P>_latency_ms_p50 * host_peak_<P>_gmacs / device peak

so the model's own efficiency (memory traffic, operator overhead) carries over from the host and
only the arithmetic rate changes. It estimates the median at one thread. Pure: numbers in,
numbers out.
"""

from __future__ import annotations

import math
import re

PRECISIONS = ("float32", "int8")
# The host's latency of each exported file, as the train step logs it (one thread, p50).
HOST_LATENCY = "tflite_{precision}_latency_ms_p50"
HOST_PEAK = "host_peak_{precision}_gmacs"
ESTIMATE = "est_{device}_{precision}_latency_ms"
# Threads of the host latency measurement (``export.tflite.edge_metrics``) and so of the peaks.
THREADS = 1
DEVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


def estimate_name(device: str, precision: str) -> str:
    return ESTIMATE.format(device=device, precision=precision)


def profile_peaks(metrics: dict[str, float]) -> dict[str, float]:
    """A profile run's peaks at :data:`THREADS` (``peak_<P>_gmacs_t1``), else its first count's."""
    peaks = {}
    for precision in PRECISIONS:
        value = metrics.get(f"peak_{precision}_gmacs_t{THREADS}")
        value = metrics.get(f"peak_{precision}_gmacs") if value is None else value
        if value is not None and math.isfinite(value) and value > 0:
            peaks[precision] = float(value)
    return peaks


def estimate_latencies(
    run_metrics: dict[str, float], profiles: dict[str, dict[str, float]]
) -> dict[str, float]:
    """``est_<device>_<P>_latency_ms`` for every profile and precision the metrics allow.

    ``run_metrics`` needs the host latency and the host peak of a precision; ``profiles`` maps a
    device name to its peaks by precision (see :func:`profile_peaks`).
    """
    estimates = {}
    for device, peaks in profiles.items():
        for precision, device_peak in peaks.items():
            host_ms = run_metrics.get(HOST_LATENCY.format(precision=precision))
            host_peak = run_metrics.get(HOST_PEAK.format(precision=precision))
            if host_ms is None or host_peak is None or not device_peak > 0:
                continue
            if not (math.isfinite(host_ms) and math.isfinite(host_peak)):
                continue
            estimates[estimate_name(device, precision)] = host_ms * host_peak / device_peak
    return estimates
