"""Serving the int8 file: shipped with the model, checked against its recorded outputs, chosen
with CARS_ML_SERVING_PRECISION=int8, refused when missing or not an integer model."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from serving_helpers import COLOURS, SIZE, colour_classifier, colour_images

from cars_ml.export.tflite import export_tflite
from cars_ml.serving.model import PRECISION_ENV, CarsClassifier
from cars_ml.serving.package import write_model_artifacts


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, str]:
    """A small trained classifier's serving artifacts with both TFLite files."""
    folder = tmp_path_factory.mktemp("int8")
    model, names = colour_classifier()
    calibration, _ = colour_images(64, seed=1)
    files = export_tflite(model, folder / "tflite", calibration)
    return write_model_artifacts(
        model,
        names,
        SIZE,
        folder / "artifacts",
        litert_model=files["float32"],
        litert_int8_model=files["int8"],
    )


class _Context:
    def __init__(self, artifacts: dict[str, str]):
        self.artifacts = artifacts


def _png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _loaded(artifacts, monkeypatch, precision: str | None) -> CarsClassifier:
    if precision is None:
        monkeypatch.delenv(PRECISION_ENV, raising=False)
    else:
        monkeypatch.setenv(PRECISION_ENV, precision)
    model = CarsClassifier()
    model.load_context(_Context(artifacts))
    return model


def test_int8_serving_answers_like_the_float_model_in_steps_of_the_int8_output(
    artifacts, monkeypatch
):
    images, labels = colour_images(12, seed=7)
    frame = pd.DataFrame({"image": [_png(i) for i in images]})
    float_model = _loaded(artifacts, monkeypatch, None)
    int8_model = _loaded(artifacts, monkeypatch, "int8")
    assert float_model.engine == "litert" and int8_model.engine == "litert-int8"
    assert float_model._model is None and int8_model._model is None  # no Keras model loaded
    floats, ints = float_model.predict(None, frame), int8_model.predict(None, frame)
    names = list(COLOURS)
    assert list(ints["label"]) == [names[i] for i in labels] == list(floats["label"])
    # The int8 file's logits are whole steps of its output scale, so the log-ratio of any two
    # served probabilities is a whole number of steps too; the float model's are not.
    step = int8_model._lite.output_step

    def log_ratios_in_steps(answers) -> np.ndarray:
        top = np.array([[item["probability"] for item in row] for row in answers["top_k"]])
        return np.log(top[:, 1:] / top[:, :1]) / step

    assert step > 0 and len(ints["top_k"][0]) >= 2
    steps = log_ratios_in_steps(ints)
    assert np.allclose(steps, np.round(steps), atol=1e-2)
    steps = log_ratios_in_steps(floats)
    assert not np.allclose(steps, np.round(steps), atol=1e-2)


def test_a_model_without_an_int8_file_or_with_a_swapped_one_is_refused(
    artifacts, monkeypatch, tmp_path
):
    without = {k: v for k, v in artifacts.items() if not k.startswith("litert_int8")}
    with pytest.raises(ValueError, match="ships no int8 file; serve it as float32"):
        _loaded(without, monkeypatch, "int8")
    swapped = tmp_path / "model_int8.tflite"
    shutil.copyfile(artifacts["litert_model"], swapped)  # the float32 file under the int8 name
    with pytest.raises(ValueError, match="not an integer model"):
        _loaded({**artifacts, "litert_int8_model": str(swapped)}, monkeypatch, "int8")
    with pytest.raises(ValueError, match="is not one of float32, int8"):
        _loaded(artifacts, monkeypatch, "fp16")
