"""The quantization-aware twin: int8 rounding of kernels and activations, shared weights,
calibration, and the exported int8 file's rounding steps."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from cars_ml.modeling import quantization


def _net(classes: int = 5) -> keras.Model:
    """A small EfficientNet-Lite-like classifier: conv-BN-ReLU6, a depthwise block with a
    residual addition, pooling and a softmax dense layer, split into a nested backbone and head
    as the product's classifiers are."""
    layers = keras.layers
    pixels = keras.Input((16, 16, 3))
    x = layers.Rescaling(1 / 128, offset=-127 / 128)(pixels)
    x = layers.Conv2D(8, 3, 2, padding="same", use_bias=False)(x)
    x = layers.ReLU(6.0)(layers.BatchNormalization()(x))
    shortcut = x
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = layers.ReLU(6.0)(layers.BatchNormalization()(x))
    x = layers.BatchNormalization()(layers.Conv2D(8, 1, use_bias=False)(x))
    x = layers.Add()([x, shortcut])
    backbone = keras.Model(pixels, layers.GlobalAveragePooling2D()(x))
    features = keras.Input((8,))
    head = keras.Model(
        features, layers.Dense(classes, activation="softmax")(layers.Dropout(0.3)(features))
    )
    image = keras.Input((16, 16, 3))
    return keras.Model(image, head(backbone(image)))


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def calibrated():
    keras.utils.set_random_seed(0)
    model = _net()
    twin = quantization.twin(model)
    quantization.calibrate(twin, [_images(32, seed) for seed in range(2)])
    return model, twin


def test_kernels_round_per_output_channel_to_127_steps_of_their_own_range():
    kernel = np.random.default_rng(0).normal(size=(3, 3, 4, 2)).astype(np.float32)
    kernel[..., 1] *= 1e-3  # a channel a thousand times smaller keeps its own resolution
    rounded = quantization.fake_quant_kernel(tf.constant(kernel)).numpy()
    for c in range(2):
        step = np.abs(kernel[..., c]).max() / 127
        levels = rounded[..., c] / step
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
        assert np.abs(rounded[..., c] - kernel[..., c]).max() <= step / 2 * 1.001
        assert not np.array_equal(rounded[..., c], kernel[..., c])


def test_the_twin_shares_the_models_weights_so_training_it_trains_the_model():
    keras.utils.set_random_seed(1)
    model = _net()
    twin = quantization.twin(model)
    assert {id(v) for v in twin.trainable_variables} == {id(v) for v in model.trainable_variables}
    quantization.calibrate(twin, [_images(16)])
    before = [w.copy() for w in model.get_weights()]
    twin.compile(keras.optimizers.SGD(0.1), "categorical_crossentropy")
    twin.fit(_images(16), np.eye(5)[np.arange(16) % 5], epochs=1, verbose=0)
    changed = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True)]
    assert any(changed)


def test_calibration_sets_each_range_to_the_float_extremes_and_then_rounds(calibrated):
    model, twin = calibrated
    ranges = quantization.ranges(twin)
    # Inputs of the first convolution (the scaled pixels), the depthwise and the 1x1
    # convolutions, both inputs of the addition, the pooling, the dense layer, the logits.
    assert len(ranges) >= 7
    assert (ranges[:, 0] <= 0).all() and (ranges[:, 1] > ranges[:, 0]).all()
    images = _images(8, seed=5)
    assert not np.allclose(twin(images).numpy(), model(images).numpy(), atol=1e-7)
    # Ranges cover what calibration saw, so the twin stays near the float model there.
    np.testing.assert_allclose(twin(images).numpy(), model(images).numpy(), atol=0.05)


def test_a_keras_applications_backbone_with_constants_and_squeeze_excitation_gets_a_twin():
    from cars_ml.modeling import backbones

    spec = backbones.get_backbone("mobilenet_v3_small")
    backbone, _ = backbones.build_backbone(spec, 32, "none")
    head = backbones.build_head(backbone.output_shape[-1], 3, 0.2, 0)
    model = backbones.build_classifier(spec, 32, backbone, head)
    twin = quantization.twin(model)
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    assert quantization.calibrate(twin, [images]) > 50
    np.testing.assert_allclose(twin(images).numpy().sum(axis=1), 1.0, rtol=1e-5)


def test_calibrating_on_nothing_names_the_fix():
    twin = quantization.twin(_net())
    with pytest.raises(ValueError, match="at least one batch"):
        quantization.calibrate(twin, [])


def test_the_twins_rounding_steps_are_the_exported_int8_files(calibrated, tmp_path):
    """Calibrated on the same images, the twin rounds each tensor to the step the int8 file
    stores it with: the logits exactly, and every other tensor but the inputs of the addition,
    which TensorFlow's calibrator widens toward the sum's range."""
    from ai_edge_litert.interpreter import Interpreter

    from cars_ml.export.tflite import export_tflite

    model, twin = calibrated
    calibration = np.concatenate([_images(32, seed) for seed in range(2)]).astype(np.uint8)
    int8 = Interpreter(model_path=str(export_tflite(model, tmp_path, calibration)["int8"]))
    steps = np.diff(quantization.ranges(twin), axis=1).ravel() / 255
    logits_step = int8.get_output_details()[0]["quantization"][0]
    assert steps[-1] == pytest.approx(logits_step, rel=1e-3)
    stored = np.array([t["quantization"][0] for t in int8.get_tensor_details()])
    matched = [np.isclose(stored, step, rtol=5e-3).any() for step in steps]
    assert sum(matched) >= len(steps) - 2, (steps, sorted(set(stored)))
