"""Latency, throughput, size and parameter count of a model (no MLflow)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Set in each worker of the pipeline's step pool (``pipeline.pool``): a lock every worker takes to
# measure, and the pids of all workers. A measurement stops the others (SIGSTOP) so that no
# reported latency shares the CPU with another step; the lock keeps two workers from stopping
# each other mid-measurement.
_SHARED: dict[str, Any] = {}


def share_measurements(lock, pids: Sequence[int]) -> None:
    """Make this process's latency measurements exclusive among the processes ``pids``."""
    _SHARED.update(lock=lock, pids=pids)


@contextlib.contextmanager
def other_workers_stopped() -> Iterator[None]:
    """Hold the measurement lock and stop the other workers for one measurement (POSIX only)."""
    lock = _SHARED.get("lock")
    if lock is None or not hasattr(signal, "SIGSTOP"):
        yield
        return
    stopped = []
    with lock:
        for pid in _SHARED["pids"]:
            if pid and pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                    stopped.append(pid)
        try:
            yield
        finally:
            for pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)


def percentiles_ms(
    fn: Callable[[], object], *, warmup: int = 5, runs: int = 50
) -> dict[str, float]:
    """Call ``fn`` ``warmup`` times untimed, then ``runs`` times; p50/p95/mean in milliseconds."""
    if runs <= 0:
        raise ValueError(f"runs must be > 0, got {runs}")
    with other_workers_stopped():
        for _ in range(warmup):
            fn()
        times = np.empty(runs)
        for i in range(runs):
            start = time.perf_counter()
            fn()
            times[i] = (time.perf_counter() - start) * 1000.0
    return {
        "p50": float(np.percentile(times, 50)),
        "p95": float(np.percentile(times, 95)),
        "mean": float(times.mean()),
    }


def file_size_mb(path: str | Path) -> float:
    """Size of a file, or of every file under a folder, in MB (10^6 bytes)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def benchmark_inference(
    infer: Callable[[np.ndarray], object],
    image_size: int,
    *,
    runs: int = 50,
    throughput_batch: int = 32,
    seed: int = 0,
) -> dict[str, float]:
    """Batch-1 latency percentiles and batch-``throughput_batch`` throughput of ``infer``.

    ``infer`` must be the compiled path serving uses, taking float32 pixels in [0, 255].
    """
    rng = np.random.default_rng(seed)
    one = rng.uniform(0, 255, (1, image_size, image_size, 3)).astype("float32")
    batch = rng.uniform(0, 255, (throughput_batch, image_size, image_size, 3)).astype("float32")
    latency = percentiles_ms(lambda: np.asarray(infer(one)), runs=runs)
    batch_runs = max(3, runs // 10)
    batch_latency = percentiles_ms(lambda: np.asarray(infer(batch)), warmup=2, runs=batch_runs)
    return {
        "latency_ms_p50": latency["p50"],
        "latency_ms_p95": latency["p95"],
        "throughput_img_per_s": throughput_batch / (batch_latency["mean"] / 1000.0),
    }
