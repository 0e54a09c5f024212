"""Stratified, seeded train/validation/test splitting of label lists (a pure decision)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from sklearn.model_selection import train_test_split

from cars_ml.data.types import DataError


class SplitIndices(NamedTuple):
    """Positions into the label list; disjoint, together covering every position."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def min_images_per_class(hold_out_test: bool) -> int:
    """Images a class needs so each split can get one (train, val and maybe test)."""
    return 3 if hold_out_test else 2


def split_indices(
    labels: Sequence[int],
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    hold_out_test: bool,
    class_names: Sequence[str] | None = None,
) -> SplitIndices:
    """Split positions of ``labels`` into stratified train / val (/ held-out test) parts.

    Fractions are of all ``labels``: with ``hold_out_test`` the result is roughly
    ``1 - val - test`` / ``val`` / ``test``; otherwise ``test`` is empty. Each held-out part gets
    at least one image per class (the stratified split needs that), so tiny datasets get
    slightly larger val/test parts. Raises ``DataError`` naming a class too small to split.
    """
    labels = np.asarray(labels, dtype=np.int64)
    counts = Counter(labels.tolist())
    _check_class_sizes(counts, hold_out_test, class_names)
    positions = np.arange(len(labels))
    num_classes = len(counts)
    test = np.array([], dtype=np.int64)
    try:
        if hold_out_test:
            n_test = max(num_classes, round(test_fraction * len(labels)))
            positions, test = train_test_split(
                positions, test_size=n_test, stratify=labels, random_state=seed, shuffle=True
            )
        n_val = max(num_classes, round(val_fraction * len(labels)))
        train, val = train_test_split(
            positions,
            test_size=n_val,
            stratify=labels[positions],
            random_state=seed + 1,
            shuffle=True,
        )
    except ValueError as exc:
        raise DataError(
            f"Cannot split {len(labels)} images of {num_classes} classes into stratified parts "
            f"(val_fraction={val_fraction}, test_fraction={test_fraction}): {exc}. Use more "
            "images per class or fewer classes (max_classes=N)."
        ) from exc
    starved = sorted(set(counts) - set(labels[train].tolist()))
    if starved:
        cls = starved[0]
        name = class_names[cls] if class_names is not None else str(cls)
        raise DataError(
            f"Class {name!r} ({counts[cls]} images) gets no training images with "
            f"val_fraction={val_fraction} and test_fraction={test_fraction}. Lower the "
            "fractions, add images, or pass max_classes=N to keep only the N most frequent classes."
        )
    return SplitIndices(np.sort(train), np.sort(val), np.sort(test))


def _check_class_sizes(counts: Counter, hold_out_test: bool, class_names) -> None:
    """Refuse a class too small for a stratified split, naming it and the fix."""
    need = min_images_per_class(hold_out_test)
    small = sorted((n, c) for c, n in counts.items() if n < need)
    if small:
        n, cls = small[0]
        name = class_names[cls] if class_names is not None else str(cls)
        parts = "train/val/test" if hold_out_test else "train/val"
        raise DataError(
            f"Class {name!r} has only {n} image(s); a stratified {parts} split needs at least "
            f"{need} per class ({len(small)} class(es) are that small). Add images, remove the "
            "class, or pass max_classes=N to keep only the N most frequent classes."
        )


def subsample_per_class(labels: Sequence[int], fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of a seeded ``fraction`` of each class (at least one image per class).

    Every class keeps ``ceil(fraction * count)`` images, so the subset has the same class balance
    as the whole and no class disappears from a small dataset.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    kept = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        count = max(1, int(np.ceil(fraction * len(members))))
        kept.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(kept)) if kept else np.array([], dtype=np.int64)
