"""Class selection, per-class caps, the fingerprint and the report helpers."""

from __future__ import annotations

import os
import warnings
from collections import Counter

import pandas as pd
import pytest
from data_helpers import write_image
from matplotlib.figure import Figure

from cars_ml.data import DataConfig, DataWarning, load_dataset, train_subset
from cars_ml.data.report import class_count_table, sample_grid_figure
from cars_ml.data.synthetic import write_annotations_mat


def _load(root, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return load_dataset(DataConfig(data=str(root), **kwargs))


@pytest.fixture()
def uneven(tmp_path):
    """Classes with 3, 9, 6 and 9 images (ties broken by the lower class id)."""
    root = tmp_path / "uneven"
    for c, (name, n) in enumerate({"a": 3, "b": 9, "c": 6, "d": 9}.items()):
        for i in range(n):
            write_image(root / name / f"{i}.jpg", seed=100 * c + i)
    return root


def test_max_classes_keeps_most_frequent_and_reindexes(uneven):
    splits = _load(uneven, max_classes=2)
    assert splits.class_names == ("b", "d")
    records = [*splits.train, *splits.val, *splits.test]
    assert {r.label for r in records} == {0, 1}
    assert all(("/b/" in r.path) == (r.label == 0) for r in records)
    assert len(records) == 18
    assert _load(uneven, max_classes=3).class_names == ("b", "c", "d")


def test_max_per_class_caps_with_a_seed(uneven):
    a = _load(uneven, max_per_class=4, seed=1)
    counts = class_count_table(a)
    assert counts["total"].tolist() == [3, 4, 4, 4]
    kept = {r.path for r in (*a.train, *a.val, *a.test)}
    again = _load(uneven, max_per_class=4, seed=1)
    assert kept == {r.path for r in (*again.train, *again.val, *again.test)}
    other = _load(uneven, max_per_class=4, seed=2)
    assert kept != {r.path for r in (*other.train, *other.val, *other.test)}


def test_train_subset_halves_each_class_and_keeps_val_and_test(uneven):
    whole = _load(uneven)
    half = train_subset(whole, 0.5, seed=3)
    assert half.val == whole.val and half.test == whole.test
    assert set(half.train) < set(whole.train)
    before = Counter(r.label for r in whole.train)
    after = Counter(r.label for r in half.train)
    assert after == {c: -(-n // 2) for c, n in before.items()}  # ceil: no class vanishes
    assert half.fingerprint != whole.fingerprint
    assert train_subset(whole, 0.5, seed=3) == half
    assert train_subset(whole, 0.5, seed=4).train != half.train
    assert train_subset(whole, 1.0, seed=3) is whole


def test_fingerprint_tracks_files_labels_and_split(uneven):
    base = _load(uneven).fingerprint
    assert _load(uneven).fingerprint == base
    assert _load(uneven, seed=7).fingerprint != base
    assert _load(uneven, val_fraction=0.2).fingerprint != base
    write_image(uneven / "c" / "0.jpg", size=(40, 30), seed=5)  # same name, new size
    assert _load(uneven).fingerprint != base
    (uneven / "d" / "0.jpg").rename(uneven / "b" / "moved.jpg")  # a relabelled file
    changed = _load(uneven).fingerprint
    assert changed != base and len(changed) == 64


def test_fingerprint_tracks_image_bytes_and_boxes(small_cars):
    """Caches and reused pipeline steps are keyed on it: a file replaced by another of the same
    size and time, or a moved crop box, must give another fingerprint."""
    base = _load(small_cars).fingerprint
    image = small_cars / "cars_train" / "00003.jpg"
    stat = image.stat()
    raw = bytearray(image.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, other bytes
    image.write_bytes(bytes(raw))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = _load(small_cars).fingerprint
    assert changed != base
    annotations = small_cars / "devkit" / "cars_train_annos.mat"
    rows = [(1, 1, 20, 20, 1 + i % 3, f"{i + 1:05d}.jpg") for i in range(18)]
    write_annotations_mat(annotations, rows)
    boxed = _load(small_cars).fingerprint
    rows[4] = (2, 1, 20, 20, *rows[4][4:])  # one box one pixel to the right
    write_annotations_mat(annotations, rows)
    assert _load(small_cars).fingerprint not in (boxed, changed)


def test_fingerprint_ignores_where_the_dataset_lives(uneven, tmp_path):
    before = _load(uneven).fingerprint
    moved = tmp_path / "elsewhere" / "uneven"
    moved.parent.mkdir()
    uneven.rename(moved)
    assert _load(moved).fingerprint == before


def test_class_count_table(uneven):
    splits = _load(uneven)
    table = class_count_table(splits)
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == ["class_id", "class_name", "train", "val", "test", "total"]
    assert table["class_name"].tolist() == ["a", "b", "c", "d"]
    assert table["total"].tolist() == [3, 9, 6, 9]
    assert (table["train"] + table["val"] + table["test"] == table["total"]).all()
    assert table["train"].sum() == len(splits.train)


def test_sample_grid_shows_class_names(small_cars):
    splits = _load(small_cars)
    fig = sample_grid_figure(splits, n=5)
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 5
    # One image per class first, then a second round.
    assert titles[:3] == ["Synthetic Coupe 01", "Synthetic Sedan 02", "Synthetic SUV 03"]
    width, height = fig.canvas.get_width_height()
    assert width > 100 and height > 100
