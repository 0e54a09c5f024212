"""The synthetic default: deterministic, real devkit struct layout, cached, learnable."""

from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.io
from data_helpers import SMALL
from PIL import Image

from cars_ml.data import DataConfig, load_dataset
from cars_ml.data.synthetic import (
    SyntheticSpec,
    class_names,
    class_style,
    ensure_synthetic,
    generate,
)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_two_generations_are_byte_identical(tmp_path):
    generate(tmp_path / "a", SMALL)
    generate(tmp_path / "b", SMALL)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == sorted(b)
    assert a == b  # .mat headers carry no timestamp
    fa = load_dataset(DataConfig(data=str(tmp_path / "a"))).fingerprint
    assert fa == load_dataset(DataConfig(data=str(tmp_path / "b"))).fingerprint
    generate(tmp_path / "c", SyntheticSpec(**{**SMALL.__dict__, "seed": 1}))
    assert _files(tmp_path / "c") != a


def _layout(value):
    """The struct layout scipy gives: field names, array shapes, element dtypes and shapes."""
    if value.dtype.names:
        first = value.flat[0]
        fields = {n: (first[n].dtype.kind, first[n].shape) for n in value.dtype.names}
        return (value.shape[0], value.dtype.names, fields)
    return (value.shape[0], value.dtype, value.flat[0].dtype.kind, value.flat[0].shape)


def test_mat_layout_matches_the_real_devkit(shared_data, small_cars):
    real, ours = shared_data / "stanford_cars_devkit", small_cars / "devkit"
    pairs = [
        ("cars_meta.mat", "cars_meta.mat", "class_names"),
        ("cars_train_annos.mat", "cars_train_annos.mat", "annotations"),
        ("cars_train_annos.mat", "cars_test_annos_withlabels.mat", "annotations"),
        ("cars_test_annos.mat", "cars_test_annos.mat", "annotations"),
    ]
    for real_name, our_name, key in pairs:
        real_mat, our_mat = scipy.io.loadmat(real / real_name), scipy.io.loadmat(ours / our_name)
        assert sorted(k for k in our_mat if not k.startswith("__")) == [key]
        assert _layout(our_mat[key]) == _layout(real_mat[key]), our_name
        assert our_mat["__header__"].startswith(b"MATLAB 5.0 MAT-file")
    annos = scipy.io.loadmat(ours / "cars_train_annos.mat")["annotations"]
    assert annos.shape == (1, 18)
    assert sorted(int(a["class"][0, 0]) for a in annos.flat) == sorted([1, 2, 3] * 6)  # 1-based


def test_ensure_reuses_without_regenerating(tmp_path):
    start = time.time()
    root = ensure_synthetic(tmp_path, SMALL)
    marker = root / "devkit" / "cars_meta.mat"
    stamp = marker.stat().st_mtime_ns
    assert ensure_synthetic(tmp_path, SMALL) == root
    assert marker.stat().st_mtime_ns == stamp
    assert root.name == f"synthetic-{SMALL.key()}"
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left over
    other = ensure_synthetic(tmp_path, SyntheticSpec(num_classes=2, train_per_class=3, width=32))
    assert other != root
    assert time.time() - start < 10


def test_default_synthetic_dataset():
    splits = load_dataset(DataConfig())  # the session cache folder (tests/conftest.py)
    assert splits.name == "synthetic" and splits.layout == "stanford_cars"
    assert splits.num_classes == 10
    assert splits.test_source == "official"
    assert len(splits.test) == 120 and len(splits.train) + len(splits.val) == 400
    assert splits.class_names[:2] == ("Synthetic Coupe 01", "Synthetic Sedan 02")
    with Image.open(splits.train[0].path) as img:
        assert (img.format, img.size, img.mode) == ("JPEG", (128, 96), "RGB")


def test_class_styles_are_unique_and_names_look_like_cars():
    styles = [class_style(i) for i in range(256)]
    assert len(set(styles)) == 256
    assert class_names(3) == ["Synthetic Coupe 01", "Synthetic Sedan 02", "Synthetic SUV 03"]


def test_boxes_enclose_the_car(small_cars):
    """Outside the box the image is background; the car (dark tyres) is inside it."""
    splits = load_dataset(DataConfig(data=str(small_cars)))
    for record in splits.train[:6]:
        pixels = np.asarray(Image.open(record.path).convert("L"), dtype=np.int16)
        x1, y1, x2, y2 = record.bbox
        assert (x2 - x1) * (y2 - y1) >= 0.1 * pixels.size
        inside = pixels[y1 : y2 + 1, x1 : x2 + 1]
        assert inside.min() < 60  # tyres are near black


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticSpec(num_classes=0)
    with pytest.raises(ValueError, match="16x16"):
        SyntheticSpec(width=8)


@pytest.mark.slow
def test_small_cnn_learns_synthetic_far_above_chance():
    """A tiny CNN trained ~20 s on 48 px crops beats 10% chance by a wide margin."""
    import keras

    from cars_ml.data.pipeline import make_dataset

    keras.utils.set_random_seed(0)
    splits = load_dataset(DataConfig())
    train = make_dataset(splits.train, 48, 32, training=True, augment_strength=0.3)
    test = make_dataset(splits.test, 48, 64, training=False)
    layers = [keras.Input((48, 48, 3)), keras.layers.Rescaling(1 / 255.0)]
    for filters in (16, 32, 64):
        layers += [keras.layers.Conv2D(filters, 3, padding="same", activation="relu")]
        layers += [keras.layers.MaxPooling2D()]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax")]
    model = keras.Sequential(layers)
    model.compile(
        keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.fit(train, epochs=30, verbose=0)
    assert model.evaluate(test, verbose=0)[1] > 0.6
