"""Every backbone builds at a tiny size and trains one step; bad names and sizes are refused."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from cars_ml.modeling import backbones
from cars_ml.modeling.optimizers import FusedAdam
from cars_ml.training.fit import compile_for_training

NAMES = sorted(backbones.BACKBONES)


def test_table_has_the_original_seven_and_the_modern_four():
    assert set(backbones.ORIGINAL_BACKBONES) <= set(NAMES)
    assert {
        "mobilenet_v2",
        "mobilenet_v3_small",
        "mobilenet_v3_large",
        "efficientnet_v2_b0",
    } <= set(NAMES)
    assert len(NAMES) == 14


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown backbone 'resnet9000'.*mobilenet.*xception"):
        backbones.get_backbone("resnet9000")


def test_image_size_below_minimum_is_refused_with_the_minimum():
    spec = backbones.get_backbone("inception")
    with pytest.raises(ValueError, match="minimum of 75"):
        backbones.resolve_image_size(spec, 64)
    assert backbones.resolve_image_size(spec, 0) == 299
    assert backbones.resolve_image_size(spec, backbones.AUTO_SIZE) == 299
    assert backbones.resolve_image_size(spec, backbones.AUTO_SIZE, synthetic=True) == 75


def test_auto_size_is_a_small_demo_size_only_on_synthetic_data():
    auto = backbones.AUTO_SIZE
    sizes = {
        name: backbones.resolve_image_size(backbones.get_backbone(name), auto, synthetic=True)
        for name in backbones.ORIGINAL_BACKBONES
    }
    assert sizes == {
        "inception_resnet": 75,
        "inception": 75,
        "mobilenet": 64,
        "resnet": 64,
        "vgg16": 32,
        "vgg19": 32,
        "xception": 71,
    }
    vgg = backbones.get_backbone("vgg16")
    assert backbones.resolve_image_size(vgg, auto) == 224  # real data: native


def test_imagenet_strict_fails_fast_naming_the_cache(monkeypatch, tmp_path):
    # Point Keras at an empty cache so the weights are absent; the download cannot succeed here.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    spec = backbones.get_backbone("mobilenet")
    with pytest.raises(ValueError, match=r"\.keras/models.*weights=none"):
        backbones.build_backbone(spec, 32, "imagenet")


def test_auto_falls_back_to_random_with_a_loud_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    spec = backbones.get_backbone("mobilenet")
    built = []
    real = backbones._construct
    monkeypatch.setattr(backbones, "_construct", lambda *a: built.append(a[2]) or real(*a))
    with pytest.warns(RuntimeWarning, match="RANDOM"):
        _, used = backbones.build_backbone(spec, 32, "auto")
    assert used == "random" and built == ["imagenet", None]
    # The failed attempt (a whole build) is not repeated in this process, and a caller that
    # only needs to know the weights gets no random backbone built for nothing.
    with pytest.warns(RuntimeWarning, match="RANDOM"):
        assert backbones.build_backbone(spec, 32, "auto", build_random=False) == (None, "random")
    with pytest.raises(ValueError, match="weights=none"):
        backbones.build_backbone(spec, 32, "imagenet")
    assert built == ["imagenet", None]


def test_weights_file_must_exist():
    with pytest.raises(ValueError, match="neither one of"):
        backbones.validate_weights("/no/such/file.h5")


def test_fine_tune_keeps_batchnorm_frozen():
    spec = backbones.get_backbone("mobilenet")
    backbone, _ = backbones.build_backbone(spec, 32, "none")
    count = backbones.set_fine_tune_layers(backbone, 0.5)
    assert 0 < count < len(backbone.layers)
    bn = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn and not any(layer.trainable for layer in bn)
    assert not backbone.layers[1].trainable  # the bottom half stays frozen


@pytest.mark.parametrize("name", NAMES)
def test_backbone_builds_and_trains_one_step(name):
    spec = backbones.get_backbone(name)
    size = spec.min_size
    backbone, used = backbones.build_backbone(spec, size, "none")
    assert used == "random"
    assert backbone.count_params() == spec.params  # the table's figure, used for scheduling
    head = backbones.build_head(backbone.output_shape[-1], 3, dropout=0.2, head_units=8)
    model = backbones.build_classifier(spec, size, backbone, head)
    # The product's own compile: optimizer built up front (one trace) with the fused update.
    compile_for_training(model, FusedAdam(1e-3), loss="sparse_categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
    y = np.array([0, 2])
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    probs = model(x, training=False).numpy()
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-4)
    keras.backend.clear_session()
