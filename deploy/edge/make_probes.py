"""Generate the calibration probes shipped in ``cars_ml_edge/probes/`` (run once, on the
training host, with the whole project installed; the files are committed).

Each probe is a single fully-connected layer from ``cars_ml.measure.peaks.dense_tflite``, the same
kind of layer the benchmark measures this host's peak on. The shape is batch 256, 256 inputs x
256 units: 16.8 M multiply-adds per invoke (long enough to time well even on a fast core), and
files small enough to ship in the package (float32 weights 256 KB, int8 64 KB).

    PYTHONPATH=. python deploy/edge/make_probes.py
"""

from __future__ import annotations

import json
from pathlib import Path

from cars_ml.measure.peaks import dense_tflite

BATCH, INPUTS, UNITS = 256, 256, 256
PROBES = Path(__file__).resolve().parent / "cars_ml_edge" / "probes"


def main() -> None:
    PROBES.mkdir(parents=True, exist_ok=True)
    for precision in ("float32", "int8"):
        content = dense_tflite(BATCH, INPUTS, UNITS, int8=precision == "int8")
        path = PROBES / f"dense_{precision}.tflite"
        path.write_bytes(content)
        print(f"{path}: {len(content) / 1024:.0f} KB")
    shape = {"batch": BATCH, "inputs": INPUTS, "units": UNITS}
    (PROBES / "shape.json").write_text(json.dumps(shape) + "\n")


if __name__ == "__main__":
    main()
