"""BatchNorm from scratch: the momentum warm-up during training and the recalibration after
it make the moving statistics follow the data."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from cars_ml.batchnorm import (
    MomentumWarmup,
    recalibrate_batchnorm,
    training_forward,
    warm_momentum,
)


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


def test_warm_momentum_is_a_running_mean_until_the_cap():
    assert [warm_momentum(t, 0.8) for t in range(6)] == [0.0, 0.5, 2 / 3, 0.75, 0.8, 0.8]
    assert warm_momentum(99, 1.0) == 0.99


class _CountCalls(keras.layers.Layer):
    """Identity that counts its Python calls: in a compiled train step, one per trace."""

    calls = 0

    def call(self, x):
        _CountCalls.calls += 1
        return x


def test_momentum_warmup_bias_corrects_the_averages_during_fit():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(4, name="dense", kernel_initializer="identity")(inputs)
    model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(_CountCalls()(hidden)))
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.full(4, -50.0, "float32"))  # Nothing of this may survive.
    x = np.random.default_rng(1).normal(3.0, 2.0, (6 * 8, 4)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((x, x)).batch(8)
    # A zero learning rate keeps the Dense kernel the identity, so BatchNorm sees x itself.
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    warmup = MomentumWarmup([bn], cap=0.8)
    traces_before = _CountCalls.calls
    model.fit(data, epochs=2, callbacks=[warmup], verbose=0, shuffle=False)

    expected = np.full(4, -50.0)
    for step, batch in enumerate(list(x.reshape(6, 8, 4)) * 2):
        m = warm_momentum(step, 0.8)
        expected = expected * m + batch.mean(axis=0) * (1 - m)
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected, rtol=1e-4)
    # The first three steps alone make a plain mean: the initial -50 is gone.
    assert np.all(np.abs(bn.moving_mean.numpy() - 3.0) < 1.5)
    assert warmup.step == 12
    assert bn.momentum == 0.8 and isinstance(bn.momentum, float)
    # Changing the variable between steps did not retrace the train step.
    assert _CountCalls.calls - traces_before == 1
