"""Class-per-folder datasets: one pool, or train/ plus test/."""

from __future__ import annotations

import pytest
from data_helpers import write_image

from cars_ml.data import DataConfig, DataError, DataWarning, load_dataset
from cars_ml.data.image_folder import is_image_folder, load_image_folder


def test_pool_layout_is_split_by_us(small_folder):
    write_image(small_folder / "Fiat 500" / "extra.PNG", fmt="PNG", seed=99)
    write_image(small_folder / "BMW M3" / "upper.JPEG", fmt="JPEG", seed=98)
    (small_folder / "BMW M3" / "notes.txt").write_text("not an image")
    (small_folder / "Audi A4" / ".hidden.jpg").write_bytes(b"editor junk")
    (small_folder / ".ipynb_checkpoints").mkdir()
    with pytest.warns(DataWarning, match="no labelled test set"):
        splits = load_dataset(DataConfig(data=str(small_folder)))
    assert splits.layout == "image_folder"
    assert splits.name == "folder"
    assert splits.class_names == ("Audi A4", "BMW M3", "Fiat 500")
    assert splits.test_source == "held_out"
    records = [*splits.train, *splits.val, *splits.test]
    assert len(records) == 17
    assert {r.label for r in splits.test} == {0, 1, 2}
    assert all(r.bbox is None for r in records)
    by_name = {r.path.rsplit("/", 1)[-1]: r.label for r in records}
    assert by_name["extra.PNG"] == 2 and by_name["upper.JPEG"] == 1


def test_train_and_test_folders(tmp_path):
    root = tmp_path / "tt"
    for c, name in enumerate(["a", "b"]):
        for i in range(4):
            write_image(root / "train" / name / f"{i}.jpg", seed=c * 10 + i)
        write_image(root / "test" / name / "t.png", fmt="PNG", seed=50 + c)
    splits = load_dataset(DataConfig(data=str(root)))
    assert splits.test_source == "folder"
    assert splits.params()["test_split"] == "folder"
    assert sorted(r.path.rsplit("/", 2)[-2] for r in splits.test) == ["a", "b"]
    assert all("/test/" in r.path for r in splits.test)
    assert all("/train/" in r.path for r in (*splits.train, *splits.val))


def test_train_folder_alone_holds_out_a_test_split(tmp_path):
    root = tmp_path / "only_train"
    for c in range(2):
        for i in range(4):
            write_image(root / "train" / f"class{c}" / f"{i}.jpg", seed=c * 10 + i)
    assert is_image_folder(root)
    layout = load_image_folder(root)
    assert layout.class_names == ["class0", "class1"] and layout.test is None
    with pytest.warns(DataWarning):
        assert load_dataset(DataConfig(data=str(root))).test_source == "held_out"


def test_test_class_without_training_folder(tmp_path):
    root = tmp_path / "tt"
    write_image(root / "train" / "a" / "0.jpg")
    write_image(root / "test" / "zebra" / "0.jpg")
    with pytest.raises(DataError, match=r"no training folder.*zebra"):
        load_dataset(DataConfig(data=str(root)))
