"""int8 quantization of a float32 TFLite flatbuffer: calibrate, measure each activation's own
range, quantize with the MLIR quantizer. Plain bytes and arrays in and out; ``tflite`` writes
the files."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np

# Each activation's range spans this quantile of its per-image extremes (:func:`own_ranges`).
RANGE_QUANTILE = 0.99


def samples(images: np.ndarray) -> Iterator[list[np.ndarray]]:
    """Calibration inputs as TensorFlow's calibrator and converter take them: one float32
    image per step."""
    for image in images:
        yield [image[None].astype(np.float32)]


def calibrated_flatbuffer(float_flatbuffer: bytes, representative: np.ndarray) -> bytes:
    """The float32 flatbuffer with the activation ranges TensorFlow's calibrator records: the
    minimum and maximum seen on ``representative``, with the inputs of an addition widened
    toward the addition's range."""
    from tensorflow.lite.python.optimize import calibrator

    model = calibrator.add_intermediate_tensors(float_flatbuffer)
    return calibrator.Calibrator(model).calibrate(lambda: samples(representative))


def own_ranges(
    calibrated: bytes, representative: np.ndarray, quantile: float = RANGE_QUANTILE
) -> bytes:
    """``calibrated`` with each inner activation's range measured on that tensor's own values.

    The calibrator widens both inputs of a residual addition to the sum's range, often twice
    what the block's projection produces, which halves that tensor's int8 resolution. Here each
    tensor an operator produces gets the ``quantile`` of its per-image minima and maxima
    instead, so a few extreme images (or a larger sample) do not widen it. The model's input
    and output keep the calibrator's full ranges: pixels span [0, 255], and clipping the logits
    could tie the top classes.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    if not 0.5 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0.5, 1], got {quantile}.")
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(calibrated))
    graph = model.subgraphs[0]
    produced = {i for op in graph.operators for i in op.outputs} - set(graph.outputs)
    ranged = sorted(i for i in produced if _has_range(graph.tensors[i]))
    low, high = _extremes(calibrated, representative, ranged)
    for k, index in enumerate(ranged):
        quantization = graph.tensors[index].quantization
        quantization.min = [float(np.quantile(low[:, k], 1.0 - quantile))]
        quantization.max = [float(np.quantile(high[:, k], quantile))]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _has_range(tensor) -> bool:
    quantization = tensor.quantization
    return quantization is not None and quantization.min is not None and len(quantization.min) == 1


def _extremes(
    content: bytes, images: np.ndarray, tensors: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's minimum and maximum of each of ``tensors`` (indices) in the float model
    ``content``, as two arrays (images, tensors)."""
    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():
        # Keeping every intermediate tensor is the point here; LiteRT warns that it costs memory.
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")
        interpreter = Interpreter(
            model_content=content, experimental_preserve_all_tensors=True, num_threads=1
        )
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]["index"]
    low = np.empty((len(images), len(tensors)), np.float32)
    high = np.empty_like(low)
    for n, (image,) in enumerate(samples(images)):
        interpreter.set_tensor(source, image)
        interpreter.invoke()
        for k, index in enumerate(tensors):
            values = interpreter.get_tensor(index)
            low[n, k], high[n, k] = values.min(), values.max()
    return low, high


def quantized_flatbuffer(calibrated: bytes) -> bytes:
    """The full-integer int8 flatbuffer (uint8 in and out) of a calibrated float flatbuffer."""
    import tensorflow as tf
    from tensorflow.lite.python.convert import mlir_quantize

    return mlir_quantize(calibrated, False, input_data_type=tf.uint8, output_data_type=tf.uint8)


def int8_flatbuffer_from_float(float_flatbuffer: bytes, representative: np.ndarray) -> bytes:
    """The full-integer int8 flatbuffer (uint8 in and out) of a float32 flatbuffer, with each
    activation's range its own (:func:`own_ranges`).

    This is what ``TFLiteConverter`` does for int8 after converting the graph (calibrate the
    float model, then quantize it with the MLIR quantizer), minus that second conversion of the
    graph, which takes most of the time (docs/performance.md). With the calibrator's ranges it
    gives the converter's very outputs (a test compares them, so a TensorFlow release that
    changes either path is caught). It uses TensorFlow's internal calibrator module;
    ``tflite.int8_flatbuffer`` falls back to the converter when that is not there.
    """
    calibrated = calibrated_flatbuffer(float_flatbuffer, representative)
    return quantized_flatbuffer(own_ranges(calibrated, representative))
