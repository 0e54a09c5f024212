"""Timing helpers that stay fair on a machine shared with other busy processes."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]], *, runs: int, warmup: int = 5
) -> dict[str, float]:
    """Median milliseconds of each function over ``runs`` calls, after ``warmup`` untimed calls.

    The functions are called in turn (a, b, c, a, b, c, ...) rather than one block after another,
    so a burst of load from another process slows every contender alike and their ratio holds.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}.")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: np.empty(runs) for name in fns}
    for i in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name][i] = (time.perf_counter() - start) * 1000.0
    return {name: float(np.median(values)) for name, values in times.items()}


def seconds(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
