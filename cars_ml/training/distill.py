"""Knowledge distillation: a student learns from a teacher's softened probabilities and the labels.

No MLflow here: a teacher is a Keras classifier (pixels in [0, 255], probabilities out) loaded
from a local model directory; ``cars_ml.training.teacher`` downloads that directory for a registered version.

Teaching from cached answers: the teacher runs once, in inference mode, over the unaugmented
training images at its own input size, and the student learns from those probabilities on
every augmented view of the image. Running the teacher inside the student's training graph
instead (the same augmented view for both) cost a CPU student about 1.6 times its own training
time for a teacher twice its size, and in a run of a dozen epochs it taught no better
(docs/real-data.md).

The loss of Hinton et al. (2015) on probabilities: with ``p`` the student's and ``q`` the
teacher's probabilities, ``alpha * CE(labels, p) + (1 - alpha) * T^2 * KL(q_T || p_T)``, where
``x_T`` is ``softmax(log(x) / T)``. ``log`` of a softmax output equals the logits up to a
constant, which the softmax cancels, so the softened distributions are exactly those of the
logits divided by ``T``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from cars_ml.training.hparams import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, check_distill_params

log = logging.getLogger(__name__)

# Probabilities are clipped before the log: a softmax output of exactly 0 would give -inf.
_EPSILON = 1e-7


@dataclass(frozen=True)
class Teacher:
    """A teacher's answers on the training images and how they mix into the student's loss.

    ``train_outputs`` holds its probabilities on the unaugmented training images, in the order
    of the split's training records.
    """

    train_outputs: np.ndarray
    temperature: float = DEFAULT_TEMPERATURE
    alpha: float = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        check_distill_params(self.temperature, self.alpha)


def soften(probs, temperature: float):
    """``softmax(log(probs) / T)``: the distribution of the logits divided by ``T``."""
    logits = keras.ops.log(keras.ops.clip(probs, _EPSILON, 1.0)) / temperature
    return keras.ops.softmax(logits, axis=-1)


@keras.saving.register_keras_serializable(package="cars_ml")
class DistillationLoss(keras.losses.Loss):
    """The distillation loss on ``y_true = concat(one-hot label, teacher probabilities)`` and
    ``y_pred`` = the student's probabilities.

    ``label_smoothing`` applies to the true-label term only, as in plain training.
    """

    def __init__(
        self,
        num_classes: int,
        temperature: float = DEFAULT_TEMPERATURE,
        alpha: float = DEFAULT_ALPHA,
        label_smoothing: float = 0.0,
        name: str = "distillation",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        check_distill_params(temperature, alpha)
        self.num_classes = int(num_classes)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        ops = keras.ops
        n = self.num_classes
        labels, teacher, student = y_true[:, :n], y_true[:, n:], y_pred
        hard = keras.losses.categorical_crossentropy(
            labels, student, label_smoothing=self.label_smoothing
        )
        t = self.temperature
        q = soften(teacher, t)
        log_p = ops.log(ops.clip(soften(student, t), _EPSILON, 1.0))
        log_q = ops.log(ops.clip(q, _EPSILON, 1.0))
        # T^2 keeps the soft term's gradients on the scale of the hard term's (Hinton et al.).
        soft = ops.sum(q * (log_q - log_p), axis=-1) * (t * t)
        return self.alpha * hard + (1.0 - self.alpha) * soft

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "temperature": self.temperature,
            "alpha": self.alpha,
            "label_smoothing": self.label_smoothing,
        }


def load_teacher_model(model_dir: str | Path) -> tuple[keras.Model, list[str]]:
    """The Keras classifier and class names of a logged serving model's local directory.

    ``model_dir`` is what MLflow downloads for a logged model (``MLmodel`` beside
    ``artifacts/``); the Keras file loads in safe mode.
    """
    from cars_ml.serving.model import _load_keras

    root = Path(model_dir)
    artifacts = root / "artifacts"
    keras_file, labels = artifacts / "model.keras", artifacts / "labels.json"
    if not keras_file.is_file() or not labels.is_file():
        raise ValueError(
            f"{root} holds no cars-ml classifier (model.keras and labels.json under artifacts/); "
            "pass a teacher registered by this project's train step, "
            "e.g. models:/stanford-cars-classifier/<version>."
        )
    return _load_keras(str(keras_file)), json.loads(labels.read_text("utf-8"))


def check_class_names(teacher_names: list[str], data_names: list[str]) -> None:
    """Teacher and dataset must name the same classes in the same order."""
    if list(teacher_names) == list(data_names):
        return
    missing = [n for n in data_names if n not in teacher_names][:3]
    detail = f"e.g. {missing} are not among the teacher's" if missing else "same names, other order"
    raise ValueError(
        f"the teacher's {len(teacher_names)} class names differ from the dataset's "
        f"{len(data_names)} ({detail}); pass a teacher trained on this dataset's classes, or "
        "the data it was trained on."
    )


def teacher_outputs_key(teacher_id: str, fingerprint: str, image_size: int) -> str:
    """Cache key of a teacher's outputs on a dataset's unaugmented images."""
    payload = json.dumps([teacher_id, fingerprint, int(image_size)])
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def cached_teacher_outputs(cache_dir: Path, key: str, compute) -> dict[str, np.ndarray]:
    """``compute()`` (a dict of arrays) once per ``key``; later calls read the ``.npz`` file.

    Written to a temporary name and renamed, so an interrupted write leaves no half file that a
    later run would trust.
    """
    path = Path(cache_dir) / f"teacher-{key}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return {name: stored[name] for name in stored.files}
    outputs = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **outputs)
    partial.replace(path)
    log.info("Cached teacher outputs in %s", path)
    return outputs
