"""Distillation: the loss, the student's training graph with a frozen teacher, the output cache,
and the from-scratch learning-rate schedule."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from cars_ml.training.distill import (
    DistillationLoss,
    Teacher,
    cached_teacher_outputs,
    check_class_names,
    soften,
    training_model,
)
from cars_ml.training.fit import WarmupStableDecay, scratch_schedule


def _probs(rows: list[list[float]]) -> np.ndarray:
    p = np.asarray(rows, np.float32)
    return p / p.sum(axis=1, keepdims=True)


STUDENT = _probs([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
TEACHER = _probs([[0.9, 0.05, 0.05], [0.2, 0.2, 0.6]])
LABELS = np.eye(3, dtype=np.float32)[[0, 2]]


def _loss(alpha: float, t: float, student=STUDENT, teacher=TEACHER) -> float:
    loss = DistillationLoss(3, temperature=t, alpha=alpha)
    return float(loss(LABELS, np.concatenate([student, teacher], axis=1)))


def test_alpha_one_is_plain_cross_entropy():
    expected = float(np.mean(-np.log(STUDENT[[0, 1], [0, 2]])))
    assert _loss(1.0, 4.0) == pytest.approx(expected, rel=1e-5)


def test_alpha_zero_is_the_scaled_kl_divergence_of_the_softened_outputs():
    t = 3.0
    q, p = np.asarray(soften(TEACHER, t)), np.asarray(soften(STUDENT, t))
    expected = float(np.mean(np.sum(q * (np.log(q) - np.log(p)), axis=1))) * t * t
    assert _loss(0.0, t) == pytest.approx(expected, rel=1e-4)
    # A student that already answers like its teacher has nothing left to learn from it.
    assert _loss(0.0, t, student=TEACHER) == pytest.approx(0.0, abs=1e-5)


def test_softening_flattens_and_keeps_the_order():
    assert np.allclose(soften(STUDENT, 1.0), STUDENT, atol=1e-6)
    soft = np.asarray(soften(STUDENT, 4.0))
    assert np.allclose(soft.sum(axis=1), 1.0, atol=1e-6)
    assert soft[0].max() < STUDENT[0].max() and soft[0].argmax() == STUDENT[0].argmax()


@pytest.mark.parametrize(("t", "alpha"), [(0.0, 0.5), (-1.0, 0.5), (4.0, -0.1), (4.0, 1.5)])
def test_bad_temperature_or_alpha_is_refused(t, alpha):
    with pytest.raises(ValueError, match="temperature|alpha"):
        DistillationLoss(3, temperature=t, alpha=alpha)


def _classifier(size: int, classes: int, seed: int, dropout: float = 0.0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    image = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 255)(image)
    x = keras.layers.Conv2D(4, 3)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(dropout)(x)
    return keras.Model(image, keras.layers.Dense(classes, activation="softmax")(x))


def test_the_teacher_stays_frozen_and_deterministic_while_the_student_trains():
    student = _classifier(16, 3, seed=1)
    # A different input size and a dropout layer: the teacher must see a resized view and run
    # in inference mode, so dropout never changes its answers.
    teacher_model = _classifier(24, 3, seed=2, dropout=0.9)
    frozen = [w.copy() for w in teacher_model.get_weights()]
    model = training_model(student, Teacher(teacher_model, 2.0, 0.5))
    images = np.random.default_rng(0).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    taught = model(images, training=True).numpy()[:, 3:]
    again = model(images, training=True).numpy()[:, 3:]
    resized = keras.layers.Resizing(24, 24)(images)
    assert np.allclose(taught, again) and np.allclose(taught, teacher_model(resized), atol=1e-5)

    model.compile(optimizer="adam", loss=DistillationLoss(3, 2.0, 0.5))
    before = [w.copy() for w in student.get_weights()]
    model.fit(images, np.eye(3, dtype=np.float32)[np.arange(8) % 3], epochs=2, verbose=0)
    for now, then in zip(teacher_model.get_weights(), frozen, strict=True):
        np.testing.assert_array_equal(now, then)  # BatchNorm statistics included
    assert any(not np.allclose(a, b) for a, b in zip(student.get_weights(), before, strict=True))


def test_a_teacher_with_other_classes_is_refused():
    with pytest.raises(ValueError, match="the teacher has 4 classes and the student 3"):
        training_model(_classifier(16, 3, 1), Teacher(_classifier(16, 4, 2)))
    with pytest.raises(ValueError, match="class names differ"):
        check_class_names(["a", "b"], ["b", "a"])
    check_class_names(["a", "b"], ["a", "b"])


def test_teacher_outputs_are_computed_once_per_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"test": np.arange(6, dtype=np.float32).reshape(2, 3)}

    first = cached_teacher_outputs(tmp_path, "k1", compute)
    second = cached_teacher_outputs(tmp_path, "k1", compute)
    assert len(calls) == 1 and np.array_equal(first["test"], second["test"])
    cached_teacher_outputs(tmp_path, "k2", compute)
    assert len(calls) == 2
    # An interrupted write leaves only a partial file, which is never read as a result.
    (tmp_path / "teacher-k3.npz.partial.npz").write_bytes(b"truncated")
    cached_teacher_outputs(tmp_path, "k3", compute)
    assert len(calls) == 3


def test_scratch_schedule_warms_up_holds_and_decays_to_zero():
    schedule = WarmupStableDecay(1e-3, total_steps=90, warmup_steps=9)
    rates = [schedule.rate(step) for step in range(90)]
    assert rates[0] < rates[4] < rates[8] < 1e-3  # warm-up
    assert rates[9] == rates[59] == 1e-3  # held until the last third
    assert all(a >= b for a, b in zip(rates[60:], rates[61:], strict=False))
    assert rates[-1] < 1e-5
    # Early stopping waits for the decay: epoch 20 of 30; the warm-up is the first epoch.
    assert scratch_schedule(30, 3) == (3, 20)
    assert scratch_schedule(2, 8) == (1, 1)
