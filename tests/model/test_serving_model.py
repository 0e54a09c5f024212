"""The logged pyfunc model: logged through tracking, loaded back, run on real photos."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from PIL import Image
from serving_helpers import (
    CAR_NAMES,
    SIZE,
    b64_file,
    colour_classifier,
    log_classifier,
    tiny_mobilenet,
)

from cars_ml import tracking
from cars_ml.serving.decode import prepare_batch
from cars_ml.serving.model import CarsClassifier
from cars_ml.serving.package import pip_requirements, write_model_artifacts


@pytest.fixture()
def logged(tracking_uri, tmp_path, monkeypatch):
    """A tiny MobileNet classifier logged as the serving pyfunc; (model_uri, keras model)."""
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    model = tiny_mobilenet()
    with tracking.start_run("serving-test"):
        info = log_classifier(model, CAR_NAMES, SIZE)
    return info.model_uri, model


def test_logged_model_predicts_real_photos(logged, car_photos):
    model_uri, keras_model = logged
    photos = [b64_file(p) for p in car_photos]
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    out = pyfunc.predict(pd.DataFrame({"image": photos}))

    assert list(out.columns) == ["label", "class_id", "probability", "top_k"]
    assert len(out) == len(photos)
    assert out["class_id"].dtype == np.int64 and out["probability"].dtype == np.float64
    pixels = prepare_batch(photos, SIZE, pyfunc.unwrap_python_model().limits)
    expected = keras_model.predict(pixels.astype("float32"), verbose=0)
    for row, probs in zip(out.itertuples(), expected, strict=True):
        assert isinstance(row.label, str) and row.label == CAR_NAMES[row.class_id]
        assert row.class_id == int(np.argmax(probs))
        assert row.probability == pytest.approx(float(probs.max()), abs=1e-5)
        assert [item["label"] for item in row.top_k] == [CAR_NAMES[i] for i in np.argsort(-probs)]
        assert len(row.top_k) == min(5, len(CAR_NAMES))
        top = [item["probability"] for item in row.top_k]
        assert top == sorted(top, reverse=True) and top[0] == pytest.approx(row.probability)


def test_logged_model_carries_what_serving_needs(logged):
    model_uri, _ = logged
    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*")}
    assert {
        "artifacts/model.keras",
        "artifacts/labels.json",
        "artifacts/serving_config.json",
    } <= files
    assert "model_code.py" in files and "code/cars_ml/serving/model.py" in files
    assert not any("__pycache__" in f for f in files)
    assert not any(f.endswith(".pkl") for f in files), "nothing may be pickled"
    config = json.loads((local / "artifacts/serving_config.json").read_text())
    assert config["image_size"] == SIZE and config["limits"]["max_images_per_request"] == 64
    requirements = (local / "requirements.txt").read_text()
    for pin in pip_requirements():
        assert pin in requirements
    signature = mlflow.models.get_model_info(model_uri).signature
    assert signature.outputs.input_names() == ["label", "class_id", "probability", "top_k"]


def test_other_input_shapes_and_bad_input(logged, car_photos):
    model_uri, _ = logged
    photo = b64_file(car_photos[0])
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    by_dict = pyfunc.predict({"image": [photo, photo]})
    by_list = pyfunc.predict([photo])
    assert len(by_dict) == 2 and by_list["label"].tolist() == by_dict["label"].tolist()[:1]

    bad_inputs = {
        "missing column 'image'": pd.DataFrame({"img": [photo]}),
        "unexpected column(s) ['extra']": pd.DataFrame({"image": [photo], "extra": [1]}),
        "image 1: expected a base64-encoded image string, got int": pd.DataFrame(
            {"image": [photo, 7]}
        ),
        "empty request": pd.DataFrame({"image": []}),
        "image 0: not an image": pd.DataFrame({"image": [base64.b64encode(b"GIF89a?").decode()]}),
    }
    for message, frame in bad_inputs.items():
        with pytest.raises(MlflowException) as info:
            pyfunc.predict(frame)
        assert message in info.value.message
        assert info.value.error_code == "INVALID_PARAMETER_VALUE"


def test_served_message_is_not_buried_under_the_echoed_request():
    # mlflow's scoring server prefixes the whole request repr to the message; we keep ours.
    from cars_ml.serving.model import BadRequest

    error = BadRequest("image 0: not an image")
    error.message = f"Failed to predict data '{'A' * 10_000}'. \nError: {error.message}"
    assert error.message == "image 0: not an image"
    assert json.loads(error.serialize_as_json())["message"] == "image 0: not an image"


def test_colour_order_survives_the_whole_serving_path(tmp_path):
    """A model trained on RGB colours must see RGB after decode (catches BGR or alpha bugs)."""
    model, names = colour_classifier()
    paths = write_model_artifacts(model, names, SIZE, tmp_path)
    served = CarsClassifier()
    served.load(paths["model"], paths["labels"], paths["serving_config"])

    def png(colour, mode="RGB"):
        buffer = io.BytesIO()
        Image.new(mode, (50, 40), colour).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    out = served.predict(None, pd.DataFrame({"image": [png((210, 40, 40)), png((40, 60, 210))]}))
    assert out["label"].tolist() == ["red", "blue"]
    assert (out["probability"] > 0.5).all()


def test_predict_images_matches_keras_and_chunks(tmp_path):
    model = tiny_mobilenet()
    served = CarsClassifier().setup(model, CAR_NAMES, SIZE)
    images = np.random.default_rng(0).integers(0, 255, (40, SIZE, SIZE, 3), dtype=np.uint8)
    probs = served.predict_images(images)  # 40 > one inference chunk of 32
    assert probs.shape == (40, 3)
    np.testing.assert_allclose(probs, model.predict(images.astype("float32"), verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match="images must have shape"):
        served.predict_images(images[:, :16])


def test_artifacts_refuse_mismatched_class_names(tmp_path):
    with pytest.raises(ValueError, match="2 class names for a model with 3 outputs"):
        write_model_artifacts(tiny_mobilenet(), CAR_NAMES[:2], SIZE, tmp_path)
    with pytest.raises(ValueError, match="does not match image_size=64"):
        write_model_artifacts(tiny_mobilenet(), CAR_NAMES, 64, tmp_path)
