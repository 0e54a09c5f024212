"""FusedAdam: Adam's results with one update op per variable."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from cars_ml.modeling.optimizers import FusedAdam


def _small_model() -> keras.Model:
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


def _train(optimizer) -> list[np.ndarray]:
    keras.utils.set_random_seed(0)
    model = _small_model()
    model.compile(optimizer, "categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 64), 3)
    model.fit(x, y, batch_size=16, epochs=3, verbose=0, shuffle=False)
    return [w.numpy() for w in model.weights]


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.01, "beta_1": 0.8, "epsilon": 1e-4}])
def test_fused_adam_trains_to_the_same_weights_as_adam(kwargs):
    reference = _train(keras.optimizers.Adam(0.01, **kwargs))
    fused = _train(FusedAdam(0.01, **kwargs))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(reference, _initial(), strict=True))
    assert moved > 0.01  # the weights did train
    gap = max(float(np.max(np.abs(a - b))) for a, b in zip(reference, fused, strict=True))
    assert gap < 1e-5


def _initial() -> list[np.ndarray]:
    keras.utils.set_random_seed(0)
    return [w.numpy() for w in _small_model().weights]


def _update_ops(optimizer) -> int:
    model = _small_model()
    optimizer.build(model.trainable_variables)
    grads = [tf.ones_like(v) for v in model.trainable_variables]

    @tf.function
    def step():
        optimizer.apply(grads, model.trainable_variables)

    return len(step.get_concrete_function().graph.get_operations())


def test_fused_adam_builds_a_much_smaller_update_graph():
    # The point of the class: fewer ops to trace and optimise per trainable variable.
    assert _update_ops(FusedAdam(1e-3)) * 2 < _update_ops(keras.optimizers.Adam(1e-3))


def test_amsgrad_falls_back_to_adams_own_update():
    reference = _train(keras.optimizers.Adam(0.01, amsgrad=True))
    fused = _train(FusedAdam(0.01, amsgrad=True))
    assert all(np.array_equal(a, b) for a, b in zip(reference, fused, strict=True))
