"""A simulated device for the benchmark: run under ``taskset``, it prints what the edge agent
would measure there (probe peaks, batch-1 latency of both files) as one JSON line.

python -m cars_ml.perf.device_sim --threads 1 model_float32.tflite model_int8.tflite
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("float32")
    parser.add_argument("int8")
    args = parser.parse_args()
    from cars_ml.export.tflite import LiteRTRunner
    from cars_ml.measure.peaks import host_peak_gmacs
    from cars_ml.measure.timing import interleaved_medians

    runners = {
        p: LiteRTRunner(getattr(args, p), num_threads=args.threads) for p in ("float32", "int8")
    }
    size = runners["int8"].image_size
    one = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    medians = interleaved_medians(
        {p: (lambda r=r: r.predict(one)) for p, r in runners.items()}, runs=args.runs
    )
    peaks = host_peak_gmacs(args.threads)
    print(json.dumps({**{f"{p}_ms": medians[p] for p in runners}, **peaks}))


if __name__ == "__main__":
    main()
