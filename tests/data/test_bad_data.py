"""Every kind of bad input gets a DataError naming the file and the fix, or is skipped."""

from __future__ import annotations

import shutil
import warnings

import pytest
from data_helpers import write_image

from cars_ml.data import DataConfig, DataError, DataWarning, load_dataset
from cars_ml.data.synthetic import write_annotations_mat, write_meta_mat

FIX = "skip_bad_images=true"


def _load(root, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return load_dataset(DataConfig(data=str(root), **kwargs))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_corrupt_image_is_named_with_the_fix(small_folder):
    bad = small_folder / "BMW M3" / "3.jpg"
    bad.write_bytes(b"this is not a JPEG")
    with pytest.raises(DataError) as err:
        _load(small_folder)
    message = str(err.value)
    assert str(bad) in message
    assert "cannot decode" in message and "Fix or remove the file" in message and FIX in message


def test_truncated_jpeg_is_named(small_cars):
    bad = small_cars / "cars_train" / "00004.jpg"
    _truncate(bad)
    with pytest.raises(DataError, match="truncated") as err:
        _load(small_cars)
    assert str(bad) in str(err.value) and FIX in str(err.value)


def test_bad_official_test_image_is_named(small_cars):
    bad = small_cars / "cars_test" / "00002.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="cars_test/00002.jpg"):
        _load(small_cars)


def test_skip_flag_skips_and_counts_bad_images(small_cars):
    _truncate(small_cars / "cars_train" / "00004.jpg")
    (small_cars / "cars_train" / "00007.jpg").write_bytes(b"junk")
    (small_cars / "cars_train" / "00009.jpg").unlink()
    with pytest.warns(DataWarning, match="Skipped 3 bad image"):
        splits = load_dataset(DataConfig(data=str(small_cars), skip_bad_images=True))
    assert splits.num_skipped == 3 and splits.summary()["num_skipped_images"] == 3
    assert splits.summary()["num_images"] == 27 - 3
    reasons = sorted(splits.skipped)
    assert reasons[0].startswith(str(small_cars / "cars_train" / "00004.jpg") + ": cannot decode")
    assert "truncated" in reasons[0]
    assert reasons[2].endswith("missing on disk")
    kept = {r.path for r in (*splits.train, *splits.val, *splits.test)}
    bad = {str(small_cars / "cars_train" / n) for n in ("00004.jpg", "00007.jpg", "00009.jpg")}
    assert not kept & bad


def test_missing_annotated_file(small_cars):
    missing = small_cars / "cars_train" / "00005.jpg"
    missing.unlink()
    with pytest.raises(DataError) as err:
        _load(small_cars)
    message = str(err.value)
    assert "missing on disk" in message and str(missing) in message
    assert "cars_train_annos.mat" in message and FIX in message


def test_class_id_out_of_range(small_cars):
    rows = [(1, 1, 20, 20, 1 + i % 3, f"{i + 1:05d}.jpg") for i in range(18)]
    rows[4] = (1, 1, 20, 20, 7, "00005.jpg")
    write_annotations_mat(small_cars / "devkit" / "cars_train_annos.mat", rows)
    with pytest.raises(DataError) as err:
        _load(small_cars)
    message = str(err.value)
    assert "record 5 (00005.jpg)" in message and "class id 7" in message
    assert "valid range 1..3" in message and "re-download the devkit" in message


def test_class_with_no_images_in_folder(small_folder):
    (small_folder / "Citroen DS").mkdir()
    with pytest.raises(DataError) as err:
        _load(small_folder)
    message = str(err.value)
    assert "'Citroen DS' has no (usable) training images" in message
    assert "max_classes=N" in message and "remove the class" in message
    # The suggested fix works: keep the 3 classes that have images.
    assert _load(small_folder, max_classes=3).class_names == ("Audi A4", "BMW M3", "Fiat 500")


def test_class_with_no_images_in_devkit(small_cars):
    names = ["Synthetic Coupe 01", "Synthetic Sedan 02", "Synthetic SUV 03", "Ghost Car 2020"]
    write_meta_mat(small_cars / "devkit" / "cars_meta.mat", names)
    with pytest.raises(DataError, match="'Ghost Car 2020' has no .* max_classes=N"):
        _load(small_cars)


def test_class_emptied_by_skipping_is_reported(small_folder):
    for path in (small_folder / "Fiat 500").iterdir():
        path.write_bytes(b"junk")
    with pytest.raises(DataError, match="'Fiat 500' has no \\(usable\\) training images"):
        _load(small_folder, skip_bad_images=True)


@pytest.mark.parametrize("missing", ["cars_meta.mat", "cars_train_annos.mat"])
def test_missing_devkit_file(small_cars, missing):
    (small_cars / "devkit" / missing).unlink()
    with pytest.raises(DataError) as err:
        _load(small_cars)
    message = str(err.value)
    assert f"Missing devkit file {small_cars / 'devkit' / missing}" in message
    assert "root/devkit/cars_meta.mat, root/devkit/cars_train_annos.mat" in message


def test_missing_training_image_folder(small_cars):
    shutil.rmtree(small_cars / "cars_train")
    with pytest.raises(DataError, match="Missing image folder .*cars_train"):
        _load(small_cars)


def test_labelled_test_file_without_test_images(small_cars):
    shutil.rmtree(small_cars / "cars_test")
    with pytest.raises(DataError, match="cars_test_annos_withlabels.mat is present .* missing"):
        _load(small_cars)


def test_devkit_file_that_is_not_a_mat_file(small_cars):
    (small_cars / "devkit" / "cars_meta.mat").write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(DataError, match="Cannot read .*cars_meta.mat as a MATLAB file"):
        _load(small_cars)


def test_unknown_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError) as err:
        _load(tmp_path)
    message = str(err.value)
    assert f"Cannot recognise the dataset layout at {tmp_path}" in message
    assert "devkit/cars_meta.mat" in message and "<class>/*.jpg" in message
    assert "'synthetic'" in message


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist. Expected one of"):
        _load(tmp_path / "nowhere")


def test_format_tensorflow_cannot_decode(small_folder):
    bad = write_image(small_folder / "Audi A4" / "sneaky.jpg", fmt="WEBP")
    with pytest.raises(DataError, match=f"{bad}: unsupported format WEBP"):
        _load(small_folder)


def test_class_too_small_to_split(small_folder):
    for path in sorted((small_folder / "BMW M3").iterdir())[2:]:
        path.unlink()
    with pytest.raises(DataError) as err:
        _load(small_folder)
    message = str(err.value)
    assert "'BMW M3' has only 2 image(s)" in message and "at least 3" in message


def test_paths_with_spaces_and_unicode(tmp_path):
    root = tmp_path / "my cars ü"
    for c, name in enumerate(["Škoda Octavia 2012", "Citroën C4 Picasso"]):
        for i in range(4):
            write_image(root / name / f"photo {i} é.jpg", seed=c * 10 + i)
    splits = _load(root)
    assert splits.class_names == ("Citroën C4 Picasso", "Škoda Octavia 2012")
    assert splits.summary()["num_images"] == 8
    assert len(splits.fingerprint) == 64
