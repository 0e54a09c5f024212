"""Compute peaks: the rate LiteRT reaches on one fully-connected layer, per precision.

The edge agent runs the same probe files on a device, so the host's and the device's peaks are
comparable and a latency measured here scales to the device (``estimate.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from cars_ml.measure.timing import interleaved_medians

THREADS = 1
# The edge agent's calibration probes (deploy/edge): the same files on the host and the device
# make their peaks comparable for latency estimates (``estimate.py``).
AGENT_PROBES = Path(__file__).resolve().parents[2] / "deploy" / "edge" / "cars_ml_edge" / "probes"
DEFAULT_PROBE_SHAPE = {"batch": 256, "inputs": 256, "units": 256}


def dense_tflite(batch: int, inputs: int, units: int, *, int8: bool, seed: int = 0) -> bytes:
    """A single ``inputs x units`` Dense layer at a fixed batch as a TFLite flatbuffer.

    The int8 file is fully integer (int8 in and out), so nothing but the matrix product runs.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((inputs,), batch_size=batch), keras.layers.Dense(units)])
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        rng = np.random.default_rng(seed)

        def samples():
            for _ in range(4):
                yield [rng.uniform(-1.0, 1.0, (batch, inputs)).astype(np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = samples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter.convert()


class Invoker:
    """A LiteRT interpreter on one flatbuffer with its input set once; ``()`` runs it."""

    def __init__(self, content: bytes, num_threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=content, num_threads=num_threads)
        self.interpreter.allocate_tensors()
        detail = self.interpreter.get_input_details()[0]
        rng = np.random.default_rng(0)
        if np.dtype(detail["dtype"]) == np.float32:
            value = rng.uniform(-1, 1, detail["shape"]).astype(np.float32)
        else:
            value = rng.integers(-100, 100, detail["shape"]).astype(detail["dtype"])
        self.interpreter.set_tensor(detail["index"], value)

    def __call__(self) -> None:
        self.interpreter.invoke()


def probe(precision: str) -> tuple[bytes, int]:
    """The agent's probe flatbuffer of ``precision`` and its multiply-adds per invoke; rebuilt
    from its recorded shape when the files are not beside the package (an installed wheel)."""
    shape_file = AGENT_PROBES / "shape.json"
    shape = json.loads(shape_file.read_text()) if shape_file.is_file() else DEFAULT_PROBE_SHAPE
    dims = (int(shape["batch"]), int(shape["inputs"]), int(shape["units"]))
    path = AGENT_PROBES / f"dense_{precision}.tflite"
    content = path.read_bytes() if path.is_file() else None
    return content or dense_tflite(*dims, int8=precision == "int8"), math.prod(dims)


def host_peak_gmacs(threads: int = THREADS, runs: int = 100, warmup: int = 5) -> dict[str, float]:
    """This host's ``host_peak_<P>_gmacs`` on the edge agent's probes at ``threads`` threads."""
    probes = {precision: probe(precision) for precision in ("float32", "int8")}
    contenders = {p: Invoker(content, threads) for p, (content, _) in probes.items()}
    medians = interleaved_medians(contenders, runs=runs, warmup=warmup)
    return {
        f"host_peak_{p}_gmacs": macs / (medians[p] / 1000.0) / 1e9
        for p, (_, macs) in probes.items()
    }
