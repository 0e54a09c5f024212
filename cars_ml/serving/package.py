"""What a logged serving model consists of: artifacts, signature, input example, requirements.

:func:`serving_model` puts them together as the keyword arguments of ``mlflow.pyfunc.log_model``
(``tracking.log_pyfunc_model`` logs them); this module only builds plain values and files, it
logs nothing.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.metadata
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, Object, Property, Schema
from PIL import Image

import cars_ml
from cars_ml.serving.decode import Limits
from cars_ml.serving.engine import int8_check, probe_images
from cars_ml.serving.model import DEFAULT_TOP_K, INPUT_COLUMN

# The models-from-code file that ``mlflow.pyfunc.log_model(python_model=...)`` records.
MODEL_CODE_PATH = str(Path(__file__).resolve().with_name("model_code.py"))
SERVING_CONFIG_VERSION = 1


def write_model_artifacts(
    model,
    class_names: list[str],
    image_size: int,
    out_dir: str | Path,
    *,
    top_k: int = DEFAULT_TOP_K,
    limits: Limits | None = None,
    litert_model: str | Path | None = None,
    saved_model: str | Path | None = None,
    reference=None,
    litert_int8_model: str | Path | None = None,
) -> dict[str, str]:
    """Save ``model.keras``, ``labels.json`` and ``serving_config.json`` into ``out_dir``, plus
    ``model_float32.tflite`` when ``litert_model`` (the exported float32 flatbuffer) is given,
    so the server runs LiteRT without converting at start, with ``litert_check.npz``: probe
    images and the probabilities TensorFlow gives for them, which the server checks the
    flatbuffer against without loading the Keras model.

    ``saved_model``: ``model`` already saved as a ``.keras`` file, copied instead of saved
    again. ``reference``: the model's traced inference (float32 pixels in, probabilities out)
    for the check; by default the model is called directly. ``litert_int8_model``: the exported
    int8 flatbuffer, shipped as ``model_int8.tflite`` with ``litert_int8_check.npz`` (its own
    outputs on the probe images) for ``CARS_ML_SERVING_PRECISION=int8``.

    Returns the ``artifacts`` mapping for ``mlflow.pyfunc.log_model`` (key -> local path).
    """
    _check_shapes(model, class_names, image_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "model": out / "model.keras",
        "labels": out / "labels.json",
        "serving_config": out / "serving_config.json",
    }
    if saved_model is not None:
        shutil.copyfile(saved_model, paths["model"])
    else:
        model.save(paths["model"])
    paths["labels"].write_text(json.dumps([str(c) for c in class_names], indent=1), "utf-8")
    config = {
        "format_version": SERVING_CONFIG_VERSION,
        "image_size": int(image_size),
        "top_k": int(top_k),
        "limits": asdict(limits or Limits()),
        "input_dtype": "uint8 RGB pixels resized to image_size x image_size (PIL bilinear)",
    }
    paths["serving_config"].write_text(json.dumps(config, indent=2), "utf-8")
    if litert_model is not None:
        call = reference or (lambda x: model(x, training=False))
        paths.update(_ship_float32(litert_model, call, image_size, out))
    if litert_int8_model is not None:
        paths.update(_ship_int8(litert_int8_model, image_size, out))
    return {key: str(path) for key, path in paths.items()}


def _check_shapes(model, class_names: list[str], image_size: int) -> None:
    num_outputs = int(model.output_shape[-1])
    if len(class_names) != num_outputs:
        raise ValueError(
            f"{len(class_names)} class names for a model with {num_outputs} outputs; pass the "
            "class names of the dataset the model was trained on, in class-id order."
        )
    expected_input = (None, image_size, image_size, 3)
    if tuple(model.input_shape) != expected_input:
        raise ValueError(
            f"model input shape {model.input_shape} does not match image_size={image_size}; "
            f"expected {expected_input}."
        )


def _ship_float32(litert_model, call, image_size: int, out: Path) -> dict[str, Path]:
    """The float32 flatbuffer and the probabilities TensorFlow gives for the probe images."""
    paths = {"litert_model": out / "model_float32.tflite", "litert_check": out / "litert_check.npz"}
    shutil.copyfile(litert_model, paths["litert_model"])
    probe = probe_images(image_size)
    expected = np.asarray(call(probe.astype(np.float32)), np.float32)
    np.savez(paths["litert_check"], images=probe, probabilities=expected)
    return paths


def _ship_int8(litert_int8_model, image_size: int, out: Path) -> dict[str, Path]:
    """The int8 flatbuffer and its own logits for the probe images."""
    paths = {
        "litert_int8_model": out / "model_int8.tflite",
        "litert_int8_check": out / "litert_int8_check.npz",
    }
    shutil.copyfile(litert_int8_model, paths["litert_int8_model"])
    content = paths["litert_int8_model"].read_bytes()
    np.savez(paths["litert_int8_check"], **int8_check(content, image_size))
    return paths


def model_signature() -> ModelSignature:
    """Output schema of the served model (``top_k`` is a real list of label/probability objects).

    The input schema is deliberately left out: MLflow's schema enforcement silently DROPS
    columns it does not know and coerces types before ``predict`` sees them, so an extra column
    or a number in ``image`` could not be refused with a 400. ``CarsClassifier.predict``
    validates the input itself; ``input_example()`` documents the format.
    """
    top_item = Object([Property("label", "string"), Property("probability", "double")])
    outputs = Schema(
        [
            ColSpec("string", "label"),
            ColSpec("long", "class_id"),
            ColSpec("double", "probability"),
            ColSpec(Array(top_item), "top_k"),
        ]
    )
    return ModelSignature(inputs=None, outputs=outputs)


def tiny_png_base64(size: int = 8, colour: tuple[int, int, int] = (128, 64, 32)) -> str:
    """A small solid-colour PNG, base64-encoded: an input example and a smoke-test request."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def input_example() -> pd.DataFrame:
    """One-row DataFrame with column ``image`` holding a base64 PNG."""
    return pd.DataFrame({INPUT_COLUMN: [tiny_png_base64()]})


def _version(*names: str) -> tuple[str, str]:
    for name in names:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise ValueError(f"none of {names} is installed; install the serving requirements.")


def pip_requirements() -> list[str]:
    """Exact pins of what serving needs, read from the running environment."""
    groups = (
        ("mlflow",),
        ("tensorflow-cpu", "tensorflow"),
        ("keras",),
        ("pillow",),
        ("numpy",),
        ("pandas",),
        ("ai-edge-litert",),  # The LiteRT inference engine (serving/engine.py).
    )
    return [f"{name}=={version}" for name, version in (_version(*group) for group in groups)]


@contextlib.contextmanager
def serving_model(model, class_names, image_size: int, **artifact_options) -> Iterator[dict]:
    """The keyword arguments of ``mlflow.pyfunc.log_model``/``save_model`` for the serving model.

    Models-from-code (``cars_ml/serving/model_code.py``) plus its artifacts
    (:func:`write_model_artifacts`, with ``artifact_options``) and a copy of the ``cars_ml``
    package as code (without caches, so only source files travel), so ``mlflow models serve
    --env-manager local`` needs nothing else and nothing is pickled. The files live until the
    block ends.
    """
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = write_model_artifacts(
            model, class_names, image_size, Path(tmp) / "a", **artifact_options
        )
        code_dir = Path(tmp) / "code" / "cars_ml"
        shutil.copytree(
            Path(cars_ml.__file__).resolve().parent,
            code_dir,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        yield {
            "python_model": MODEL_CODE_PATH,
            "artifacts": artifacts,
            "code_paths": [str(code_dir)],
            "signature": model_signature(),
            "input_example": input_example(),
            "pip_requirements": pip_requirements(),
        }
