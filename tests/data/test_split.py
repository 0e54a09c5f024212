"""The stratified split as a pure decision: properties over random label lists, and tables."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cars_ml.data.split import split_indices, subsample_per_class
from cars_ml.data.types import DataError


def _labels(counts: list[int], seed: int) -> list[int]:
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    np.random.default_rng(seed).shuffle(labels)
    return labels


def _assert_stratified(part: np.ndarray, pool: np.ndarray, labels: np.ndarray) -> None:
    """Each class's share of ``part`` is its share of ``pool`` to within one image."""
    ratio = len(part) / len(pool)
    in_pool, in_part = Counter(labels[pool].tolist()), Counter(labels[part].tolist())
    for cls, n in in_pool.items():
        assert abs(in_part[cls] - n * ratio) < 1 + 1e-9, (cls, n, in_part[cls], ratio)


split_cases = st.fixed_dictionaries(
    {
        "counts": st.lists(st.integers(3, 40), min_size=1, max_size=12),
        "val_fraction": st.floats(0.05, 0.45),
        "test_fraction": st.floats(0.05, 0.45),
        "seed": st.integers(0, 2**31 - 1),
        "hold_out_test": st.booleans(),
        "order": st.integers(0, 1000),
    }
)


@settings(max_examples=80, deadline=None)
@given(split_cases)
def test_split_properties(case):
    labels = np.asarray(_labels(case.pop("counts"), case.pop("order")))
    try:
        parts = split_indices(labels, **case)
    except DataError as exc:
        # Only tiny classes can run out of images across the stratified steps.
        assert any(m in str(exc) for m in ("Cannot split", "has only", "gets no training images"))
        return
    train, val, test = parts
    everything = np.concatenate([train, val, test])
    assert sorted(everything.tolist()) == list(range(len(labels)))  # covers all, disjoint
    assert set(labels[train]) == set(labels.tolist())  # every class trains
    if case["hold_out_test"]:
        _assert_stratified(test, np.arange(len(labels)), labels)
    else:
        assert len(test) == 0
    _assert_stratified(val, np.concatenate([train, val]), labels)
    again = split_indices(labels, **case)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))  # deterministic


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(8, 60), min_size=1, max_size=15),
    val_fraction=st.floats(0.05, 0.3),
    test_fraction=st.floats(0.05, 0.3),
    seed=st.integers(0, 10_000),
)
def test_classes_of_eight_always_split(counts, val_fraction, test_fraction, seed):
    labels = _labels(counts, seed)
    train, val, test = split_indices(
        labels,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        hold_out_test=True,
    )
    n = len(labels)
    assert len(val) == max(len(counts), round(val_fraction * n))
    assert len(test) == max(len(counts), round(test_fraction * n))
    assert len(train) + len(val) + len(test) == n


def test_class_starved_of_training_images():
    with pytest.raises(DataError, match="Class 'a' \\(3 images\\) gets no training images"):
        split_indices(
            _labels([3, 13], 0),
            val_fraction=0.4375,
            test_fraction=0.4375,
            seed=0,
            hold_out_test=True,
            class_names=["a", "b"],
        )


def test_seed_changes_the_split():
    labels = _labels([20, 20, 20], 0)
    a = split_indices(labels, val_fraction=0.2, test_fraction=0.2, seed=1, hold_out_test=True)
    b = split_indices(labels, val_fraction=0.2, test_fraction=0.2, seed=2, hold_out_test=True)
    assert not np.array_equal(a.test, b.test)


@pytest.mark.parametrize(
    ("counts", "hold_out", "message"),
    [
        ([5, 2, 5], True, "Class 'b' has only 2 image(s); a stratified train/val/test split"),
        ([5, 1, 5], False, "Class 'b' has only 1 image(s); a stratified train/val split"),
        ([1, 1, 9], True, "(2 class(es) are that small)"),
    ],
)
def test_tiny_class_error_names_the_class(counts, hold_out, message):
    with pytest.raises(DataError) as err:
        split_indices(
            _labels(counts, 0),
            val_fraction=0.15,
            test_fraction=0.15,
            seed=0,
            hold_out_test=hold_out,
            class_names=["a", "b", "c"],
        )
    assert message in str(err.value) and "max_classes=N" in str(err.value)


def test_each_held_out_part_gets_every_class_in_a_tiny_dataset():
    labels = _labels([3, 3, 3, 3], 0)  # 15% of 12 would be 2 images for 4 classes
    train, val, test = split_indices(
        labels, val_fraction=0.15, test_fraction=0.15, seed=0, hold_out_test=True
    )
    arr = np.asarray(labels)
    assert sorted(arr[test]) == sorted(arr[val]) == sorted(arr[train]) == [0, 1, 2, 3]


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 10_000),
)
def test_subsample_keeps_each_class_share(counts, fraction, seed):
    labels = np.asarray(_labels(counts, seed))
    kept = subsample_per_class(labels, fraction, seed)
    assert len(set(kept.tolist())) == len(kept) and np.all(np.diff(kept) > 0)
    got = Counter(labels[kept].tolist())
    assert got == {
        c: max(1, int(np.ceil(fraction * n))) for c, n in Counter(labels.tolist()).items()
    }
    assert np.array_equal(kept, subsample_per_class(labels, fraction, seed))


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_subsample_rejects_a_fraction_outside_0_1(fraction):
    with pytest.raises(ValueError, match=f"fraction must be in \\(0, 1\\], got {fraction}"):
        subsample_per_class([0, 1, 1], fraction, 0)
