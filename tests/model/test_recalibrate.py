"""BatchNorm recalibration after training from scratch: the moving statistics follow the data."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from cars_ml.train import recalibrate_batchnorm, training_forward


def _model():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(4, name="dense", kernel_initializer="identity")(inputs)
    normed = keras.layers.BatchNormalization(name="bn")(hidden)
    return keras.Model(inputs, normed)


def test_moving_statistics_are_re_estimated_and_momentum_restored():
    model = _model()
    bn = model.get_layer("bn")
    bn.momentum = 0.99
    # Stale averages, as after a short run from scratch.
    bn.moving_mean.assign(np.full(4, -50.0, "float32"))
    bn.moving_variance.assign(np.full(4, 1e-3, "float32"))
    x = np.random.default_rng(0).normal([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 0.5, 3.0], (640, 4))
    data = tf.data.Dataset.from_tensor_slices((x.astype("float32"), np.zeros(640))).batch(32)
    kernel_before = model.get_layer("dense").kernel.numpy().copy()

    assert recalibrate_batchnorm(model, model, data) == 20
    # The plain mean of the 20 batches' statistics: the stale values are gone entirely.
    batches = x[:640].reshape(20, 32, 4)
    np.testing.assert_allclose(bn.moving_mean.numpy(), batches.mean(axis=1).mean(axis=0),
                               rtol=1e-4)  # fmt: skip
    np.testing.assert_allclose(bn.moving_variance.numpy(), batches.var(axis=1).mean(axis=0),
                               rtol=1e-3)  # fmt: skip
    assert bn.momentum == 0.99
    np.testing.assert_array_equal(model.get_layer("dense").kernel.numpy(), kernel_before)


def test_frozen_batchnorm_and_empty_data_are_left_alone():
    model = _model()
    bn = model.get_layer("bn")
    bn.trainable = False
    x = np.ones((64, 4), "float32")
    data = tf.data.Dataset.from_tensor_slices((x, np.zeros(64))).batch(32)
    assert recalibrate_batchnorm(model, model, data) == 0
    np.testing.assert_array_equal(bn.moving_mean.numpy(), np.zeros(4))
    bn.trainable = True
    assert recalibrate_batchnorm(model, model, data.take(0)) == 0


def test_training_forward_traces_once_for_every_batch_size():
    model = _model()
    step = training_forward(model)
    for rows in (32, 32, 5):  # The last batch of a dataset is usually smaller.
        assert step(np.ones((rows, 4), "float32")).shape == (rows, 4)
    assert step.experimental_get_tracing_count() == 1
