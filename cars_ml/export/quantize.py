"""int8 quantization of a float32 TFLite flatbuffer: calibrate the activation ranges, then
quantize with the MLIR quantizer. Plain bytes and arrays in and out; ``tflite`` writes the
files."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


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


def quantized_flatbuffer(calibrated: bytes) -> bytes:
    """The full-integer int8 flatbuffer (uint8 in and out) of a calibrated float flatbuffer."""
    import tensorflow as tf
    from tensorflow.lite.python.convert import mlir_quantize

    return mlir_quantize(calibrated, False, input_data_type=tf.uint8, output_data_type=tf.uint8)


def int8_flatbuffer_from_float(float_flatbuffer: bytes, representative: np.ndarray) -> bytes:
    """The full-integer int8 flatbuffer (uint8 in and out) of a float32 flatbuffer.

    This is what ``TFLiteConverter`` does for int8 after converting the graph (calibrate the
    float model, then quantize it with the MLIR quantizer), minus that second conversion of the
    graph, which takes most of the time (docs/performance.md), with the converter's very
    outputs (a test compares them, so a TensorFlow release that changes either path is caught).
    It uses TensorFlow's internal calibrator module; ``tflite.int8_flatbuffer`` falls back to
    the converter when that is not there.
    """
    return quantized_flatbuffer(calibrated_flatbuffer(float_flatbuffer, representative))
