"""Distillation: the loss, the teacher's answers travelling with their images through training,
the output cache, and the from-scratch learning-rate schedule."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from cars_ml.training.callbacks import WarmupStableDecay, scratch_schedule
from cars_ml.training.distill import (
    DistillationLoss,
    cached_teacher_outputs,
    check_class_names,
    soften,
)


def _probs(rows: list[list[float]]) -> np.ndarray:
    p = np.asarray(rows, np.float32)
    return p / p.sum(axis=1, keepdims=True)


STUDENT = _probs([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
TEACHER = _probs([[0.9, 0.05, 0.05], [0.2, 0.2, 0.6]])
LABELS = np.eye(3, dtype=np.float32)[[0, 2]]


def _loss(alpha: float, t: float, student=STUDENT, teacher=TEACHER) -> float:
    loss = DistillationLoss(3, temperature=t, alpha=alpha)
    return float(loss(np.concatenate([LABELS, teacher], axis=1), student))


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


def test_each_image_is_taught_with_its_own_teachers_answer_through_the_shuffle(tmp_path):
    from PIL import Image

    from cars_ml.data import ImageRecord
    from cars_ml.data.pipeline import make_dataset

    records = []
    for i in range(8):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (12, 12), (i * 30, 0, 0)).save(path)
        records.append(ImageRecord(str(path), i % 3))
    # Row i says "image i" in its first column, so a pairing survives any order.
    targets = np.zeros((8, 4), np.float32)
    targets[:, 0] = np.arange(8)
    data = make_dataset(
        records, 8, 3, training=True, shuffle_seed=1, augment_strength=0.5, targets=targets
    )
    seen = []
    for images, labels, taught in data:
        for image, label, row in zip(images.numpy(), labels.numpy(), taught.numpy(), strict=True):
            index = int(row[0])
            assert label == index % 3
            assert abs(float(image[..., 0].mean()) - index * 30) < 40  # the same picture
            seen.append(index)
    assert sorted(seen) == list(range(8)) and seen != list(range(8))
    with pytest.raises(ValueError, match="3 target rows for 8 records"):
        make_dataset(records, 8, 3, training=True, targets=targets[:3])


def test_a_student_learns_towards_its_teacher_where_labels_say_nothing():
    """With alpha 0 the teacher alone teaches: a student fitted on its answers predicts them."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    teacher = np.eye(3, dtype=np.float32)[(x[:, 0] > 0).astype(int) * 2]  # class 0 or 2
    labels = np.eye(3, dtype=np.float32)[np.zeros(64, int)]  # labels that say class 0
    student = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    student.compile(keras.optimizers.Adam(0.05), loss=DistillationLoss(3, 1.0, 0.0))
    student.fit(x, np.concatenate([labels, teacher], axis=1), epochs=60, verbose=0)
    agreement = np.mean(student(x).numpy().argmax(1) == teacher.argmax(1))
    assert agreement > 0.9


def test_a_teacher_with_other_classes_is_refused(tmp_path):
    from cars_ml.data import DatasetSplits, ImageRecord
    from cars_ml.modeling import backbones
    from cars_ml.training.distill import Teacher
    from cars_ml.training.fit import fit
    from cars_ml.training.hparams import HParams

    records = tuple(ImageRecord(str(tmp_path / f"{i}.png"), i % 3) for i in range(6))
    splits = DatasetSplits(
        "d",
        "image_folder",
        str(tmp_path),
        ("a", "b", "c"),
        records,
        records,
        records,
        "held_out",
        "f",
    )
    spec = backbones.get_backbone("mobilenet")
    backbone, used = backbones.build_backbone(spec, 32, "none")
    with pytest.raises(ValueError, match=r"shape \(6, 4\), not \(6, 3\)"):
        fit(splits, spec, 32, backbone, used, HParams(), teacher=Teacher(np.zeros((6, 4))))
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
