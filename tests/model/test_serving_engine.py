"""The LiteRT serving engine: same probabilities as TensorFlow, safe under concurrent requests,
refused (so serving falls back to TensorFlow) when it disagrees with TensorFlow."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from serving_helpers import SIZE, colour_classifier, colour_images

from cars_ml.serving.engine import litert_engine
from cars_ml.serving.model import CarsClassifier


def test_litert_engine_matches_tensorflow_and_is_thread_safe():
    model, names = colour_classifier()
    lite = CarsClassifier().setup(model, names, SIZE)
    assert lite.engine == "litert"
    reference = CarsClassifier().setup(model, names, SIZE, engine="tensorflow")
    assert reference.engine == "tensorflow"
    images, labels = colour_images(40, seed=3)
    expected = reference.predict_images(images)
    np.testing.assert_allclose(lite.predict_images(images), expected, atol=1e-5)
    assert np.mean(expected.argmax(axis=1) == labels) > 0.9, "the model must have learned"
    # mlflow models serve runs requests in threads: concurrent calls must not mix results.
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: lite.predict_images(images[i : i + 1]), range(40)))
    np.testing.assert_allclose(np.concatenate(results), expected, atol=1e-5)
    assert lite.predict_images(images[:0]).shape == (0, len(names))


def test_engine_that_disagrees_with_tensorflow_is_refused():
    model, _ = colour_classifier()

    def wrong_reference(x):
        return np.zeros((int(x.shape[0]), 3), np.float32)

    assert litert_engine(model, SIZE, wrong_reference) is None
