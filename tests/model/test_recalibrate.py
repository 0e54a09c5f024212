"""BatchNorm from scratch: the momentum warm-up during training and the recalibration after
it make the moving statistics follow the data."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from cars_ml.modeling.batchnorm import MomentumWarmup, recalibrate_batchnorm, warm_momentum
from cars_ml.modeling.optimizers import FusedAdam


class _CountCalls(keras.layers.Layer):
    """Identity that counts its Python calls: in a compiled train step, one per trace."""

    calls = 0

    def call(self, x):
        _CountCalls.calls += 1
        return x


def _model(momentum: float = 0.99) -> keras.Model:
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(4, name="dense", kernel_initializer="identity")(inputs)
    normed = keras.layers.BatchNormalization(name="bn", momentum=momentum)(_CountCalls()(hidden))
    return keras.Model(inputs, normed)


def _data(x: np.ndarray, batch: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((x, x)).batch(batch)


def _trained(x: np.ndarray) -> tuple[keras.Model, MomentumWarmup]:
    """A model after one epoch of fit() with the momentum warm-up, as train.fit leaves it."""
    model = _model(0.8)
    model.compile(optimizer=FusedAdam(0.01), loss="mse")
    warmup = MomentumWarmup([model.get_layer("bn")], cap=0.8)
    model.fit(_data(x, 32), epochs=1, verbose=0, shuffle=False, callbacks=[warmup])
    return model, warmup


def test_warm_momentum_is_a_running_mean_until_the_cap():
    assert [warm_momentum(t, 0.8) for t in range(6)] == [0.0, 0.5, 2 / 3, 0.75, 0.8, 0.8]
    assert warm_momentum(99, 1.0) == 0.99


def test_momentum_warmup_bias_corrects_the_averages_during_fit():
    model = _model()
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.full(4, -50.0, "float32"))  # Nothing of this may survive.
    x = np.random.default_rng(1).normal(3.0, 2.0, (6 * 8, 4)).astype("float32")
    # A zero learning rate keeps the Dense kernel the identity, so BatchNorm sees x itself.
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    warmup = MomentumWarmup([bn], cap=0.8)
    traces_before = _CountCalls.calls
    model.fit(_data(x, 8), epochs=2, callbacks=[warmup], verbose=0, shuffle=False)

    expected = np.full(4, -50.0)
    for step, batch in enumerate(list(x.reshape(6, 8, 4)) * 2):
        m = warm_momentum(step, 0.8)
        expected = expected * m + batch.mean(axis=0) * (1 - m)
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected, rtol=1e-4)
    # The first three steps alone make a plain mean: the initial -50 is gone.
    assert np.all(np.abs(bn.moving_mean.numpy() - 3.0) < 1.5)
    assert warmup.step == 12
    assert bn.momentum == 0.99 and isinstance(bn.momentum, float)
    # Changing the variable between steps did not retrace the train step.
    assert _CountCalls.calls - traces_before == 1


def test_recalibration_re_estimates_the_statistics_without_moving_a_weight():
    rng = np.random.default_rng(0)
    x = rng.normal([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 0.5, 3.0], (700, 4)).astype("float32")
    model, warmup = _trained(x)
    bn = model.get_layer("bn")
    # Stale averages, as after a short run from scratch.
    bn.moving_mean.assign(np.full(4, -50.0, "float32"))
    bn.moving_variance.assign(np.full(4, 1e-3, "float32"))
    before = [w.copy() for w in model.get_layer("dense").get_weights()]
    traces_before = _CountCalls.calls

    # 22 batches on offer; RECALIBRATION_BATCHES (20) are used.
    assert recalibrate_batchnorm(model, warmup, _data(x, 32)) == 20
    # The plain mean of the 20 batches' statistics: the stale values are gone entirely.
    batches = x[:640].reshape(20, 32, 4) @ before[0] + before[1]
    np.testing.assert_allclose(bn.moving_mean.numpy(), batches.mean(axis=1).mean(axis=0), rtol=1e-4)
    np.testing.assert_allclose(
        bn.moving_variance.numpy(), batches.var(axis=1).mean(axis=0), rtol=1e-3
    )
    for after, was in zip(model.get_layer("dense").get_weights(), before, strict=True):
        np.testing.assert_array_equal(after, was)
    # It ran the train step fit() had traced, and gave back momentum and learning rate.
    assert _CountCalls.calls == traces_before
    assert bn.momentum == 0.8 and warmup.cap == 0.8
    assert keras.ops.convert_to_numpy(model.optimizer.learning_rate) == np.float32(0.01)


def test_no_layers_empty_data_and_models_trained_without_the_warmup():
    x = np.ones((64, 4), "float32")
    model, warmup = _trained(x)
    stats = model.get_layer("bn").moving_mean.numpy().copy()
    assert recalibrate_batchnorm(model, MomentumWarmup([], cap=0.8), _data(x, 32)) == 0
    assert recalibrate_batchnorm(model, warmup, _data(x, 32).take(0)) == 0
    np.testing.assert_array_equal(model.get_layer("bn").moving_mean.numpy(), stats)
    # Without the warm-up the traced step holds a constant momentum: refuse, do not pretend.
    plain = _model()
    plain.compile(optimizer=FusedAdam(0.01), loss="mse")
    plain.fit(_data(x, 32), epochs=1, verbose=0, shuffle=False)
    with pytest.raises(ValueError, match="MomentumWarmup"):
        recalibrate_batchnorm(plain, MomentumWarmup([plain.get_layer("bn")], 0.8), _data(x, 32))
