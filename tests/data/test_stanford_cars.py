"""The Stanford Cars reader against the real devkit files and the low-resolution real root."""

from __future__ import annotations

import logging
import shutil

import pytest

from cars_ml.data import DataConfig, DataWarning, load_dataset
from cars_ml.data.stanford_cars import clamp_bbox, read_annotations, read_class_names


def test_real_class_names(shared_data):
    names = read_class_names(shared_data / "stanford_cars_devkit" / "cars_meta.mat")
    assert len(names) == 196
    assert names[0] == "AM General Hummer SUV 2000"
    assert all(isinstance(n, str) and n for n in names)


def test_real_training_annotations(shared_data):
    devkit = shared_data / "stanford_cars_devkit"
    rows = read_annotations(devkit / "cars_train_annos.mat")
    names = read_class_names(devkit / "cars_meta.mat")
    assert len(rows) == 8144
    first = rows[0]
    assert first["fname"] == "00001.jpg"
    assert names[first["class"] - 1] == "Audi TTS Coupe 2012"  # class ids are 1-based
    assert first["box"] == (39, 116, 569, 375)
    assert {r["class"] for r in rows} == set(range(1, 197))


def test_real_test_annotations_have_no_labels(shared_data):
    rows = read_annotations(shared_data / "stanford_cars_devkit" / "cars_test_annos.mat")
    assert len(rows) == 8041
    assert all(r["class"] is None for r in rows)


def test_lowres_root_loads_with_held_out_test(shared_data):
    root = shared_data / "stanford_cars_lowres"
    with pytest.warns(DataWarning) as caught:
        splits = load_dataset(DataConfig(data=str(root)))
    assert splits.layout == "stanford_cars"
    assert splits.num_classes == 196
    assert splits.summary()["num_images"] == 4000
    assert splits.test_source == "held_out"
    assert splits.params()["test_split"] == "held_out"
    assert {r.label for r in splits.test} == set(range(196))  # stratified: every class tested
    # Its boxes are in the original images' coordinates: none fits the 100x40 copies.
    assert splits.bbox_fallbacks == 4000
    assert all(r.bbox is None for r in splits.train)
    messages = " ".join(str(w.message) for w in caught)
    assert "no labelled test set" in messages and "4000 of 4000" in messages


def test_tree_under_stanford_cars_subfolder(small_cars, tmp_path):
    outer = tmp_path / "download"
    outer.mkdir()
    shutil.move(small_cars, outer / "stanford_cars")
    splits = load_dataset(DataConfig(data=str(outer)))
    assert splits.layout == "stanford_cars"
    assert splits.test_source == "official"
    assert splits.class_names[0] == "Synthetic Coupe 01"


def test_labelled_test_file_at_root(small_cars):
    shutil.move(small_cars / "devkit" / "cars_test_annos_withlabels.mat", small_cars)
    splits = load_dataset(DataConfig(data=str(small_cars)))
    assert splits.test_source == "official"
    assert len(splits.test) == 9
    assert all("/cars_test/" in r.path for r in splits.test)


def test_unlabelled_test_file_is_ignored(small_cars, caplog):
    (small_cars / "devkit" / "cars_test_annos_withlabels.mat").unlink()
    with caplog.at_level(logging.INFO), pytest.warns(DataWarning, match="no labelled test set"):
        splits = load_dataset(DataConfig(data=str(small_cars)))
    assert splits.test_source == "held_out"
    assert all("/cars_train/" in r.path for r in splits.test)
    assert "cars_test_annos.mat" in caplog.text and "no class labels" in caplog.text


def test_official_split_keeps_test_and_splits_train(small_cars):
    splits = load_dataset(DataConfig(data=str(small_cars), val_fraction=0.2))
    assert len(splits.test) == 9 and len(splits.train) + len(splits.val) == 18
    assert {r.label for r in splits.val} == {0, 1, 2}


def test_crop_boxes_fit_their_images(small_cars):
    splits = load_dataset(DataConfig(data=str(small_cars)))
    records = [*splits.train, *splits.val, *splits.test]
    assert splits.bbox_fallbacks == 0
    for r in records:
        x1, y1, x2, y2 = r.bbox
        assert 0 <= x1 < x2 <= 47 and 0 <= y1 < y2 <= 31
    plain = load_dataset(DataConfig(data=str(small_cars), crop_to_bbox=False))
    assert all(r.bbox is None for r in plain.train)
    assert plain.fingerprint != splits.fingerprint


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ((10, 5, 50, 30), (10, 5, 50, 30)),  # inside
        ((0, 0, 99, 39), (0, 0, 99, 39)),  # exactly the image
        ((3, 2, 104, 41), (3, 2, 99, 39)),  # a few pixels past the edge: clamped
        ((39, 116, 569, 375), None),  # other coordinates (the low-res copies)
        ((10, 5, 200, 30), None),  # far past the right edge
        ((20, 5, 20, 30), None),  # zero width
        ((30, 5, 20, 30), None),  # inverted
        ((99, 0, 104, 39), None),  # empty after clamping
    ],
)
def test_clamp_bbox(box, expected):
    assert clamp_bbox(box, 100, 40) == expected
