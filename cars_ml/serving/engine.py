"""LiteRT inference for the served model: the Keras model converted in memory to a float32
TFLite flatbuffer and run by the LiteRT interpreter (XNNPACK kernels), one image at a time.

At batch 1 on a CPU this runs MobileNet at 224 px about 3x faster than TensorFlow's compiled
``tf.function`` and on one thread per request, so a busy machine slows it far less (measured
side by side by the ``benchmark`` entry point; see README "Performance"). The arithmetic is the
same float32 model: probabilities agree with TensorFlow's to about 1e-6, and
:func:`litert_engine` refuses the engine when they do not.
"""

from __future__ import annotations

import logging
import os
import queue

import numpy as np

from cars_ml.export.tflite import probabilities

log = logging.getLogger(__name__)

# Largest probability difference to TensorFlow accepted when the engine is built. Float32 kernels
# that only order their sums differently stay near 1e-6; a broken conversion is off by far more.
AGREEMENT_TOLERANCE = 1e-4
MAX_INTERPRETERS = 4


# A recorded check of the int8 file compares its logits and allows two of their quantization
# steps, since another CPU's kernels may round one value the other way.
INT8_TOLERANCE_STEPS = 2


class LiteRTEngine:
    """A pool of single-threaded LiteRT interpreters over one flatbuffer (float32 or int8).

    An interpreter is not thread-safe and ``mlflow models serve`` runs requests in threads, so
    each call borrows one interpreter; with one per core, concurrent requests use every core.
    The int8 file takes uint8 pixels and gives uint8 logits: each tensor's scale and zero point
    convert them and the softmax follows, so callers pass uint8 pixels and get float
    probabilities either way.
    """

    def __init__(self, content: bytes, image_size: int, interpreters: int = 0):
        from ai_edge_litert.interpreter import Interpreter

        count = interpreters or max(1, min(MAX_INTERPRETERS, os.cpu_count() or 1))
        self.image_size = int(image_size)
        self._pool: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(count):
            interpreter = Interpreter(model_content=content, num_threads=1)
            detail = interpreter.get_input_details()[0]
            interpreter.resize_tensor_input(
                detail["index"], [1, self.image_size, self.image_size, 3]
            )
            interpreter.allocate_tensors()
            self._pool.put(interpreter)
        output = interpreter.get_output_details()[0]
        self._input, self._output = detail["index"], output["index"]
        self._input_dtype = np.dtype(detail["dtype"])
        self._input_scale, self._input_zero = detail["quantization"]
        self._output_scale, self._output_zero = output["quantization"]
        self.num_classes = int(output["shape"][-1])
        self.output_name = output["name"]
        self.precision = "float32" if self._input_dtype == np.float32 else "int8"

    def _quantize(self, image: np.ndarray) -> np.ndarray:
        if self._input_dtype == np.float32:
            return image.astype(np.float32)
        if self._input_scale == 0:  # An integer input that takes pixels as they are.
            return image.astype(self._input_dtype)
        info = np.iinfo(self._input_dtype)
        q = np.round(image.astype(np.float32) / self._input_scale + self._input_zero)
        return np.clip(q, info.min, info.max).astype(self._input_dtype)

    def _dequantize(self, values: np.ndarray) -> np.ndarray:
        if np.issubdtype(values.dtype, np.floating) or self._output_scale == 0:
            return values.astype(np.float32)
        return (values.astype(np.float32) - self._output_zero) * np.float32(self._output_scale)

    @property
    def output_step(self) -> float:
        """The output's quantization step (0 for a float output)."""
        return float(self._output_scale)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``(n, num_classes)`` for uint8 RGB images ``(n, s, s, 3)``."""
        return probabilities(self.outputs(images), self.output_name)

    def outputs(self, images: np.ndarray) -> np.ndarray:
        """The file's dequantized outputs (its logits) for uint8 RGB images ``(n, s, s, 3)``."""
        out = np.empty((len(images), self.num_classes), np.float32)
        interpreter = self._pool.get()
        try:
            for i in range(len(images)):
                interpreter.set_tensor(self._input, self._quantize(images[i : i + 1]))
                interpreter.invoke()
                out[i] = self._dequantize(interpreter.get_tensor(self._output))[0]
        finally:
            self._pool.put(interpreter)
        return out


def probe_images(image_size: int) -> np.ndarray:
    """Two seeded random uint8 images: what an engine is checked on against TensorFlow."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (2, image_size, image_size, 3), dtype=np.uint8)


def _checked(
    engine: LiteRTEngine,
    probe: np.ndarray,
    expected: np.ndarray,
    tolerance: float = AGREEMENT_TOLERANCE,
    what: str = "TensorFlow's",
) -> LiteRTEngine:
    gap = float(np.max(np.abs(engine(probe) - np.asarray(expected, np.float32))))
    if not gap <= tolerance:
        raise ValueError(f"its probabilities differ from {what} by {gap:.2e}")
    return engine


def int8_check(content: bytes, image_size: int) -> dict[str, np.ndarray]:
    """Probe images and the int8 file's own logits for them, recorded when the model is logged:
    a server checks the file it loads against them (a damaged or swapped file, or a runtime
    that computes something else, is refused)."""
    probe = probe_images(image_size)
    return {"images": probe, "logits": LiteRTEngine(content, image_size, 1).outputs(probe)}


def int8_engine(content: bytes, image_size: int, check: str) -> LiteRTEngine:
    """An engine over the shipped int8 flatbuffer, checked against its recorded outputs; raises
    ``ValueError`` naming the problem (int8 was asked for, so there is no silent fallback)."""
    with np.load(check) as recorded:
        probe, expected = recorded["images"], recorded["logits"]
    engine = LiteRTEngine(content, image_size)
    if engine.precision != "int8":
        raise ValueError("the shipped model_int8.tflite is not an integer model")
    gap = float(np.max(np.abs(engine.outputs(probe) - expected)))
    if not gap <= INT8_TOLERANCE_STEPS * engine.output_step:
        raise ValueError(f"its logits differ from those recorded at logging time by {gap:.2e}")
    return engine


def recorded_engine(content: bytes, image_size: int, check: str) -> LiteRTEngine | None:
    """An engine over the shipped flatbuffer ``content``, checked against the probabilities
    TensorFlow gave for the probe images when the model was logged (``check``: the
    ``litert_check.npz`` artifact). This proves the flatbuffer is this model as the TensorFlow
    check does, without loading the Keras model or importing TensorFlow at all. ``None`` (with
    a warning) when it fails: the caller then loads the Keras model and checks live."""
    try:
        with np.load(check) as recorded:
            probe, expected = recorded["images"], recorded["probabilities"]
        if probe.shape[1:3] != (image_size, image_size):
            raise ValueError(f"its probe images are {probe.shape[1]} px, not {image_size} px")
        return _checked(LiteRTEngine(content, image_size), probe, expected)
    except Exception as exc:  # noqa: BLE001 -- any failure means: check against TensorFlow.
        log.warning("The shipped LiteRT model failed its recorded check (%s).", exc)
        return None


def litert_engine(
    model, image_size: int, reference, content: bytes | None = None
) -> LiteRTEngine | None:
    """An engine over ``content`` (a float32 flatbuffer of ``model``, e.g. the one the train step
    exported), or over ``model`` converted now when it is ``None``; checked against
    ``reference`` (TensorFlow inference, float32 pixels in, probabilities out) on two probe
    images. ``None`` (with a warning) when conversion fails or disagrees, so serving falls back
    to TensorFlow. A shipped flatbuffer spares every server start the conversion (tens of
    seconds for a large backbone); the check still proves it is this model."""
    try:
        import tensorflow as tf

        from cars_ml.export.tflite import float32_flatbuffer, inference_function

        if content is None:
            content = float32_flatbuffer(inference_function(model))
        probe = probe_images(image_size)
        expected = np.asarray(reference(tf.constant(probe, tf.float32)))
        return _checked(LiteRTEngine(content, image_size), probe, expected)
    except Exception as exc:  # noqa: BLE001 -- any failure means: serve with TensorFlow instead.
        log.warning("Serving with TensorFlow: the LiteRT engine is unavailable (%s).", exc)
        return None
