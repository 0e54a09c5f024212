"""``load_dataset``: find a dataset, check every image, select classes and split it.

The steps run in this order: resolve ``data`` (the synthetic default or a path) and detect its
layout; keep the ``max_classes`` most frequent classes and cap ``max_per_class``; decode every
remaining image (bad ones raise or are skipped); reject classes left without images; split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

from cars_ml.data import image_folder, stanford_cars, synthetic
from cars_ml.data.split import split_indices, subsample_per_class
from cars_ml.data.types import (
    DataConfig,
    DataError,
    DatasetSplits,
    DataWarning,
    ImageRecord,
    LayoutData,
    default_cache_dir,
    file_sha256,
)
from cars_ml.data.validate import validate_records

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic"
EXPECTED_LAYOUTS = (
    "Expected one of: a Stanford Cars root (devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
    "cars_train/; also under stanford_cars/); an image folder (<class>/*.jpg|jpeg|png, or "
    "train/<class>/ plus test/<class>/); or 'synthetic' for the built-in generated dataset."
)


def load_dataset(config: DataConfig) -> DatasetSplits:
    """Load, validate and split the dataset named by ``config.data``.

    Raises ``DataError`` (a ``ValueError``) with the file and the fix for any bad input.
    """
    name, layout = _read_layout(config)
    layout = _select(layout, config)
    pool, skipped = validate_records(layout.train, skip_bad_images=config.skip_bad_images)
    test = None
    if layout.test is not None:
        test, bad_test = validate_records(layout.test, skip_bad_images=config.skip_bad_images)
        skipped += bad_test
    skipped = layout.skipped + skipped
    _check_no_empty_class(layout, pool)
    hold_out = test is None
    parts = split_indices(
        [r.label for r in pool],
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.seed,
        hold_out_test=hold_out,
        class_names=layout.class_names,
    )
    train = tuple(pool[i] for i in parts.train)
    val = tuple(pool[i] for i in parts.val)
    test = tuple(pool[i] for i in parts.test) if hold_out else tuple(test)
    if hold_out:
        _warn(
            f"{layout.root} has no labelled test set; holding out a stratified "
            f"{config.test_fraction:.0%} test split of the training images (seed {config.seed}), "
            "recorded as test_split=held_out."
        )
    kept = {r.path for r in (*train, *val, *test)}
    fallbacks = len(layout.bbox_fallback_paths & kept)
    if fallbacks:
        _warn(
            f"{fallbacks} of {len(kept)} images have a bounding box that does not fit the image "
            "(outside it or empty); they are used whole instead of cropped."
        )
    if skipped:
        _warn(f"Skipped {len(skipped)} bad image(s) (skip_bad_images=true), first: {skipped[0]}")
    test_source = "held_out" if hold_out else layout.test_source
    return DatasetSplits(
        name=name,
        layout=layout.layout,
        root=layout.root,
        class_names=tuple(layout.class_names),
        train=train,
        val=val,
        test=test,
        test_source=test_source,
        fingerprint=fingerprint(layout, (*train, *val, *test), config, test_source),
        skipped=tuple(skipped),
        bbox_fallbacks=fallbacks,
    )


def check_data_path(config: DataConfig) -> None:
    """Fail at once on a dataset path that does not exist (before a step loads TensorFlow)."""
    if config.data.strip().lower() != SYNTHETIC:
        root = Path(config.data).expanduser()
        if not root.exists():
            raise DataError(f"Dataset path {root} does not exist. {EXPECTED_LAYOUTS}")


def _read_layout(config: DataConfig) -> tuple[str, LayoutData]:
    """The dataset's display name and what its layout reader found."""
    if config.data.strip().lower() == SYNTHETIC:
        cache = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
        root = synthetic.ensure_synthetic(cache)
        name = SYNTHETIC
    else:
        check_data_path(config)
        root = Path(config.data).expanduser().resolve()
        name = root.name
    cars_root = stanford_cars.find_root(root)
    if cars_root is not None:
        layout = stanford_cars.load_stanford_cars(
            cars_root, crop_to_bbox=config.crop_to_bbox, skip_bad_images=config.skip_bad_images
        )
    elif image_folder.is_image_folder(root):
        layout = image_folder.load_image_folder(root)
    else:
        raise DataError(f"Cannot recognise the dataset layout at {root}. {EXPECTED_LAYOUTS}")
    log.info("Found %s layout at %s (%d classes)", layout.layout, root, len(layout.class_names))
    return name, layout


def _select(layout: LayoutData, config: DataConfig) -> LayoutData:
    """Keep the ``max_classes`` most frequent classes (re-indexed) and cap ``max_per_class``."""
    names = layout.class_names
    if config.max_classes and config.max_classes < len(names):
        counts = Counter(r.label for r in [*layout.train, *(layout.test or [])])
        # Most images first; ties go to the lower class id so the choice is deterministic.
        ranked = sorted(range(len(names)), key=lambda c: (-counts[c], c))
        keep = sorted(ranked[: config.max_classes])
        new_id = {old: new for new, old in enumerate(keep)}

        def relabel(records: list[ImageRecord]) -> list[ImageRecord]:
            return [replace(r, label=new_id[r.label]) for r in records if r.label in new_id]

        layout = replace(
            layout,
            class_names=[names[c] for c in keep],
            train=relabel(layout.train),
            test=None if layout.test is None else relabel(layout.test),
        )
    if config.max_per_class:
        rng = random.Random(config.seed)
        layout = replace(
            layout,
            train=_cap(layout.train, config.max_per_class, rng),
            test=None if layout.test is None else _cap(layout.test, config.max_per_class, rng),
        )
    return layout


def train_subset(splits: DatasetSplits, fraction: float, seed: int) -> DatasetSplits:
    """``splits`` with a stratified, seeded ``fraction`` of its training images.

    Validation and test stay whole, so scores stay comparable with full-data runs. The
    fingerprint changes with the subset: caches keyed on it never mix the two.
    """
    if fraction == 1.0:
        return splits
    keep = subsample_per_class([r.label for r in splits.train], fraction, seed)
    digest = hashlib.sha256(f"{splits.fingerprint}|train_fraction={fraction}|{seed}".encode())
    return replace(
        splits, train=tuple(splits.train[i] for i in keep), fingerprint=digest.hexdigest()
    )


def _cap(records: list[ImageRecord], limit: int, rng: random.Random) -> list[ImageRecord]:
    by_class: dict[int, list[ImageRecord]] = {}
    for record in records:
        by_class.setdefault(record.label, []).append(record)
    kept = []
    for label in sorted(by_class):
        group = by_class[label]
        kept.extend(group if len(group) <= limit else rng.sample(group, limit))
    return sorted(kept, key=lambda r: r.path)


def _check_no_empty_class(layout: LayoutData, pool: list[ImageRecord]) -> None:
    counts = Counter(r.label for r in pool)
    empty = [name for c, name in enumerate(layout.class_names) if counts[c] == 0]
    if empty:
        raise DataError(
            f"Class {empty[0]!r} has no (usable) training images in {layout.root} "
            f"({len(empty)} class(es) are empty: {empty[:5]}). Add images for it, remove the "
            "class, or pass max_classes=N to keep only the N most frequent classes."
        )


def fingerprint(
    layout: LayoutData, records: tuple[ImageRecord, ...], config: DataConfig, test_source: str
) -> str:
    """sha256 of the class names, the split params and every record's relative path, label,
    crop box and file content: any change of image bytes or annotations gives another one."""
    digest = hashlib.sha256()
    params = {
        "class_names": list(layout.class_names),
        "val_fraction": config.val_fraction,
        "test_fraction": config.test_fraction,
        "seed": config.seed,
        "crop_to_bbox": config.crop_to_bbox,
        "max_classes": config.max_classes,
        "max_per_class": config.max_per_class,
        "test_source": test_source,
    }
    digest.update(json.dumps(params, sort_keys=True).encode())
    rows = sorted(
        (Path(os.path.relpath(r.path, layout.root)).as_posix(), r.label, r.bbox, r.path)
        for r in records
    )
    # The bytes, not the size or modification time: those miss a file replaced by another of the
    # same size (copies that keep times). Reading every file is cheap beside any training step.
    for rel, label, bbox, path in rows:
        digest.update(f"{rel}\t{label}\t{bbox}\t{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _warn(message: str) -> None:
    # One channel only (not also logging), so the console does not show everything twice.
    warnings.warn(message, DataWarning, stacklevel=3)
