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

log = logging.getLogger(__name__)

# Largest probability difference to TensorFlow accepted when the engine is built. Float32 kernels
# that only order their sums differently stay near 1e-6; a broken conversion is off by far more.
AGREEMENT_TOLERANCE = 1e-4
MAX_INTERPRETERS = 4


class LiteRTEngine:
    """A pool of single-threaded LiteRT interpreters over one float32 flatbuffer.

    An interpreter is not thread-safe and ``mlflow models serve`` runs requests in threads, so
    each call borrows one interpreter; with one per core, concurrent requests use every core.
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
        self._input = detail["index"]
        self._output = interpreter.get_output_details()[0]["index"]
        self.num_classes = int(interpreter.get_output_details()[0]["shape"][-1])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``(n, num_classes)`` for uint8 RGB images ``(n, s, s, 3)``."""
        out = np.empty((len(images), self.num_classes), np.float32)
        interpreter = self._pool.get()
        try:
            for i in range(len(images)):
                interpreter.set_tensor(self._input, images[i : i + 1].astype(np.float32))
                interpreter.invoke()
                out[i] = interpreter.get_tensor(self._output)[0]
        finally:
            self._pool.put(interpreter)
        return out


def probe_images(image_size: int) -> np.ndarray:
    """Two seeded random uint8 images: what an engine is checked on against TensorFlow."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (2, image_size, image_size, 3), dtype=np.uint8)


def _checked(engine: LiteRTEngine, probe: np.ndarray, expected: np.ndarray) -> LiteRTEngine:
    gap = float(np.max(np.abs(engine(probe) - np.asarray(expected, np.float32))))
    if not gap <= AGREEMENT_TOLERANCE:
        raise ValueError(f"its probabilities differ from TensorFlow's by {gap:.2e}")
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

        from cars_ml.export import float32_flatbuffer, inference_function

        if content is None:
            content = float32_flatbuffer(inference_function(model))
        probe = probe_images(image_size)
        expected = np.asarray(reference(tf.constant(probe, tf.float32)))
        return _checked(LiteRTEngine(content, image_size), probe, expected)
    except Exception as exc:  # noqa: BLE001 -- any failure means: serve with TensorFlow instead.
        log.warning("Serving with TensorFlow: the LiteRT engine is unavailable (%s).", exc)
        return None
