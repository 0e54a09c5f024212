"""The served pyfunc model: base64 images in, class names and probabilities out.

It loads its class names and serving config and runs inference through LiteRT (``engine.py``;
about 3x faster than a traced ``tf.function`` at batch 1) on the float32 flatbuffer shipped with
the model, checked against the probabilities TensorFlow recorded for it, so the Keras model is
not even loaded. Without a shipped flatbuffer, or when its check fails, it loads the Keras model
in safe mode and converts it at load time, or runs one traced ``tf.function`` (several times
faster than ``model.predict`` or eager calls at batch 1) when that fails. Bad input
raises ``MlflowException(INVALID_PARAMETER_VALUE)``, which ``mlflow models serve`` answers with
HTTP 400 and keeps serving.

Output, one row per image: ``label`` (class name), ``class_id`` (0-based index into the class
names stored with the model, ``labels.json``; NOT the 1-based Stanford Cars devkit id),
``probability`` (of that class) and ``top_k`` (list of ``{"label", "probability"}``, best first,
``k = min(top_k, num_classes)``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from cars_ml.serving.decode import (
    DecodeBudget,
    Limits,
    RequestError,
    limits_from_env,
    prepare_batch,
)

INPUT_COLUMN = "image"
OUTPUT_COLUMNS = ("label", "class_id", "probability", "top_k")
DEFAULT_TOP_K = 5
# Images per forward pass: bounds activation memory for large requests without hurting speed.
INFERENCE_CHUNK = 32
# Inference engines: LiteRT (float32 flatbuffer, XNNPACK) by default, TensorFlow as fallback.
ENGINES = ("litert", "tensorflow")
# Set to int8 in the server's environment (``serve -P precision=int8`` does) to serve the int8
# flatbuffer the edge device runs instead of the float32 one.
PRECISION_ENV = "CARS_ML_SERVING_PRECISION"


class BadRequest(MlflowException):
    """A rejected request: ``mlflow models serve`` answers it with HTTP 400 and this message.

    The scoring server rewrites the message of any ``MlflowException`` from ``predict`` to
    ``"Failed to predict data '<repr of the whole request>'. Error: <message>"``; for a refused
    10 MB image that echoes megabytes of base64 back to the client and buries the reason. This
    class keeps its own message when a rewrite only adds such a prefix.
    """

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        previous = getattr(self, "_message", None)
        self._message = previous if previous is not None and value.endswith(previous) else value


def _bad_request(message: str) -> BadRequest:
    return BadRequest(message)


def _check_columns(columns: list[str]) -> None:
    if INPUT_COLUMN not in columns:
        raise _bad_request(
            f"missing column 'image' (got columns {columns}); send "
            '{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}} or '
            '{"inputs": {"image": ["<base64>"]}}.'
        )
    extra = [c for c in columns if c != INPUT_COLUMN]
    if extra:
        raise _bad_request(
            f"unexpected column(s) {extra}; the model takes exactly one column 'image' "
            "holding base64-encoded JPEG or PNG bytes."
        )


def _column_values(frame: pd.DataFrame) -> list:
    _check_columns([str(c) for c in frame.columns])
    return frame[INPUT_COLUMN].tolist()


def extract_images(model_input: Any) -> list:
    """The list of request values from a DataFrame, a ``{"image": [...]}`` dict or a list."""
    if isinstance(model_input, pd.DataFrame):
        return _column_values(model_input)
    if isinstance(model_input, dict):
        _check_columns([str(k) for k in model_input])
        values = model_input[INPUT_COLUMN]
        if isinstance(values, str):
            return [values]
        if isinstance(values, (list, tuple, np.ndarray, pd.Series)):
            return list(np.asarray(values, dtype=object).reshape(-1))
        raise _bad_request(
            f"'image' must be a list of base64 strings, got {type(values).__name__}."
        )
    if isinstance(model_input, pd.Series):
        return model_input.tolist()
    if isinstance(model_input, (list, tuple, np.ndarray)):
        values = list(np.asarray(model_input, dtype=object).reshape(-1))
        if values and all(isinstance(v, dict) for v in values):
            return _column_values(pd.DataFrame(values))
        return values
    raise _bad_request(
        f"unsupported input type {type(model_input).__name__}; send a DataFrame with one column "
        "'image' of base64 strings."
    )


def _load_keras(path: str):
    import keras

    import cars_ml.layers.preprocess  # noqa: F401 -- registers ImagePreprocess for safe mode

    return keras.models.load_model(path, safe_mode=True, compile=False)


class CarsClassifier(mlflow.pyfunc.PythonModel):
    """Stanford Cars classifier as an MLflow pyfunc (models-from-code, see model_code.py)."""

    _model = None
    _model_path: str | None = None

    def load_context(self, context) -> None:
        from cars_ml.serving.scoring_guard import harden_scoring_server

        artifacts = context.artifacts
        precision = os.environ.get(PRECISION_ENV, "").strip().lower() or "float32"
        if precision == "int8":
            self.load_int8(artifacts)
        elif precision == "float32":
            self.load(
                artifacts["model"],
                artifacts["labels"],
                artifacts["serving_config"],
                artifacts.get("litert_model"),
                artifacts.get("litert_check"),
            )
        else:
            raise ValueError(
                f"{PRECISION_ENV}={precision!r} is not one of float32, int8; unset it to serve "
                "the float32 model."
            )
        # In `mlflow models serve` this bounds each request's memory and the server's
        # concurrency by this model's limits, and answers bad requests with short 4xx errors.
        harden_scoring_server(self.limits)

    def load_int8(self, artifacts: dict[str, str]) -> None:
        """Serve the shipped int8 flatbuffer (what the edge device runs), checked against the
        outputs recorded for it at logging time; no TensorFlow, no Keras model."""
        from cars_ml.serving.engine import int8_engine

        if "litert_int8_model" not in artifacts or "litert_int8_check" not in artifacts:
            raise ValueError(
                f"{PRECISION_ENV}=int8, but this model version ships no int8 file; serve it as "
                "float32, or train it again with export_tflite=true."
            )
        class_names = json.loads(Path(artifacts["labels"]).read_text(encoding="utf-8"))
        config = json.loads(Path(artifacts["serving_config"]).read_text(encoding="utf-8"))
        image_size = int(config["image_size"])
        content = Path(artifacts["litert_int8_model"]).read_bytes()
        lite = int8_engine(content, image_size, artifacts["litert_int8_check"])
        self._model_path = artifacts["model"]
        self._configure(
            None,
            class_names,
            image_size,
            lite.num_classes,
            top_k=int(config.get("top_k", DEFAULT_TOP_K)),
            limits=limits_from_env(Limits(**config.get("limits", {}))),
        )
        self._lite, self.engine = lite, "litert-int8"

    def load(
        self,
        model_path: str,
        labels_path: str,
        config_path: str,
        litert_path: str | None = None,
        check_path: str | None = None,
    ) -> None:
        """Load the artifacts written by ``package.write_model_artifacts``.

        A shipped float32 flatbuffer that passes its recorded check (``check_path``) is served
        without loading the Keras model or importing TensorFlow: a server starts in seconds and
        holds only LiteRT's memory. Otherwise the Keras model is loaded (safe mode) and the
        engine checked against it live, with TensorFlow as the fallback engine.
        """
        from cars_ml.serving.engine import recorded_engine

        class_names = json.loads(Path(labels_path).read_text(encoding="utf-8"))
        config = json.loads(Path(config_path).read_text(encoding="utf-8"))
        options = {
            "top_k": int(config.get("top_k", DEFAULT_TOP_K)),
            "limits": limits_from_env(Limits(**config.get("limits", {}))),
        }
        image_size = int(config["image_size"])
        engine = str(config.get("engine", "litert"))
        content = Path(litert_path).read_bytes() if litert_path else None
        self._model_path = model_path
        if engine == "litert" and content is not None and check_path:
            lite = recorded_engine(content, image_size, check_path)
            if lite is not None and lite.num_classes == len(class_names):
                self._configure(None, class_names, image_size, lite.num_classes, **options)
                self._lite, self.engine = lite, "litert"
                return
        self.setup(
            _load_keras(model_path),
            class_names,
            image_size,
            engine=engine,
            litert_content=content,
            **options,
        )

    @property
    def model(self):
        """The Keras model; loaded on first use when serving did not need it (LiteRT)."""
        if self._model is None:
            self._model = _load_keras(self._model_path)
        return self._model

    def _configure(self, model, class_names, image_size, num_classes, *, top_k, limits) -> None:
        if len(class_names) != num_classes:
            raise ValueError(
                f"{len(class_names)} class names for a model with {num_classes} outputs; "
                "pass the class names the model was trained with."
            )
        self._model = model
        self._infer = None
        self.class_names = [str(c) for c in class_names]
        self.image_size = int(image_size)
        self.top_k = max(1, min(int(top_k), num_classes))
        self.limits = limits or Limits()
        # Shared by the server's request threads: bounds the memory of the decodes at once.
        self._decode_budget = DecodeBudget(self.limits.decode_memory_mb)

    def setup(
        self,
        model,
        class_names: Sequence[str],
        image_size: int,
        *,
        top_k: int = DEFAULT_TOP_K,
        limits: Limits | None = None,
        engine: str = "litert",
        litert_content: bytes | None = None,
    ) -> CarsClassifier:
        """Wire an in-memory Keras model (also used by benchmarks to time the serving path).

        ``engine="litert"`` runs inference through LiteRT (``serving/engine.py``), falling back
        to the compiled ``tf.function`` when conversion fails; ``"tensorflow"`` always uses the
        latter. ``self.engine`` says which one is in use. ``litert_content`` is the model's
        float32 flatbuffer when one was exported with it (then nothing is converted here).
        """
        import tensorflow as tf

        from cars_ml.serving.engine import litert_engine

        if engine not in ENGINES:
            raise ValueError(f"engine={engine!r} is not one of {ENGINES}.")

        self._configure(
            model, class_names, image_size, int(model.output_shape[-1]), top_k=top_k, limits=limits
        )
        spec = tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.float32)

        @tf.function(input_signature=[spec])
        def infer(x):
            return model(x, training=False)

        self._infer = infer
        # Trace once now, so the first request does not pay for graph construction.
        self._infer(tf.zeros([1, self.image_size, self.image_size, 3], tf.float32))
        self._lite = (
            litert_engine(model, self.image_size, infer, litert_content)
            if engine == "litert"
            else None
        )
        self.engine = "litert" if self._lite is not None else "tensorflow"
        return self

    def predict_images(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``(n, num_classes)`` for uint8 RGB images ``(n, s, s, 3)``."""
        import tensorflow as tf

        images = np.asarray(images)
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"images must have shape (n, {expected}), got {images.shape}.")
        if self._lite is not None:
            return self._lite(images)
        chunks = [
            self._infer(tf.constant(images[i : i + INFERENCE_CHUNK], tf.float32)).numpy()
            for i in range(0, len(images), INFERENCE_CHUNK)
        ]
        if not chunks:
            return np.zeros((0, len(self.class_names)), np.float32)
        return np.concatenate(chunks, axis=0)

    def format_predictions(self, probabilities: np.ndarray) -> pd.DataFrame:
        """One output row per image (see module docstring for the columns)."""
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, : self.top_k]
        best = order[:, 0]
        rows = np.arange(len(probabilities))
        top_k = [
            [
                {"label": self.class_names[j], "probability": float(probabilities[i, j])}
                for j in order[i]
            ]
            for i in rows
        ]
        return pd.DataFrame(
            {
                "label": [self.class_names[j] for j in best],
                "class_id": best.astype(np.int64),
                "probability": probabilities[rows, best].astype(np.float64),
                "top_k": top_k,
            }
        )

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Classify base64 images (column ``image``); bad input raises a 400-mapped error.

        MLflow enforces the logged signature and hands in a DataFrame (a dict or list still
        works when called directly). The DataFrame hint also tells MLflow that the explicit
        signature stands, so it neither infers one from hints nor warns that there are none.
        """
        values = extract_images(model_input)
        try:
            pixels = prepare_batch(values, self.image_size, self.limits, self._decode_budget)
        except RequestError as exc:
            raise _bad_request(str(exc)) from None
        return self.format_predictions(self.predict_images(pixels))
