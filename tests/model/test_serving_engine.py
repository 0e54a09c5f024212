"""The LiteRT serving engine: same probabilities as TensorFlow, safe under concurrent requests,
refused (so serving falls back to TensorFlow) when it disagrees with TensorFlow."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def test_shipped_flatbuffer_is_served_without_converting_and_a_wrong_one_refused(
    tmp_path, monkeypatch
):
    import keras

    from cars_ml.export.tflite import export_tflite
    from cars_ml.serving.package import write_model_artifacts

    model, names = colour_classifier()
    images, _ = colour_images(8, seed=5)
    exported = export_tflite(model, tmp_path / "right", images)["float32"]
    stranger = keras.models.clone_model(model)  # same graph, freshly initialised weights
    wrong = export_tflite(stranger, tmp_path / "wrong", images)["float32"]
    expected = CarsClassifier().setup(model, names, SIZE, engine="tensorflow")

    def no_conversion(*args, **kwargs):
        raise AssertionError("the shipped flatbuffer must be used, not a new conversion")

    monkeypatch.setattr("cars_ml.export.tflite.float32_flatbuffer", no_conversion)
    paths = write_model_artifacts(model, names, SIZE, tmp_path / "a", litert_model=exported)
    served = CarsClassifier()
    served.load(paths["model"], paths["labels"], paths["serving_config"], paths["litert_model"])
    assert served.engine == "litert"
    np.testing.assert_allclose(
        served.predict_images(images), expected.predict_images(images), atol=1e-5
    )
    # A flatbuffer of another model fails the check against TensorFlow: serving falls back.
    mixed_up = CarsClassifier().setup(model, names, SIZE, litert_content=Path(wrong).read_bytes())
    assert mixed_up.engine == "tensorflow"


def test_checked_flatbuffer_is_served_without_loading_keras(tmp_path, monkeypatch):
    from cars_ml.export.tflite import export_tflite
    from cars_ml.serving import model as served_model
    from cars_ml.serving.package import write_model_artifacts

    model, names = colour_classifier()
    images, _ = colour_images(8, seed=6)
    exported = export_tflite(model, tmp_path / "e", images)["float32"]
    expected = CarsClassifier().setup(model, names, SIZE, engine="tensorflow")
    paths = write_model_artifacts(model, names, SIZE, tmp_path / "a", litert_model=exported)
    args = [paths[k] for k in ("model", "labels", "serving_config", "litert_model", "litert_check")]

    loads = []
    real_load = served_model._load_keras
    monkeypatch.setattr(served_model, "_load_keras", lambda p: loads.append(p) or real_load(p))
    served = CarsClassifier()
    served.load(*args)
    assert served.engine == "litert" and loads == []
    np.testing.assert_allclose(
        served.predict_images(images), expected.predict_images(images), atol=1e-5
    )
    assert served.model.output_shape[-1] == len(names) and len(loads) == 1  # loaded on demand

    # A check that does not match the flatbuffer (here: recorded for other probabilities) sends
    # the load back to Keras and the live check, which this flatbuffer passes.
    with np.load(paths["litert_check"]) as check:
        np.savez(
            paths["litert_check"], images=check["images"], probabilities=1 - check["probabilities"]
        )
    fallback = CarsClassifier()
    fallback.load(*args)
    assert len(loads) == 2 and fallback.engine == "litert"
    np.testing.assert_allclose(
        fallback.predict_images(images), expected.predict_images(images), atol=1e-5
    )
