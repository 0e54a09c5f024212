"""Compiling for training creates every optimizer variable before the first step."""

from __future__ import annotations

import keras
import numpy as np

from cars_ml.training.fit import compile_for_training


def test_optimizer_variables_exist_before_the_first_train_step():
    # A tf.function that creates variables is traced twice; for a large backbone that trace is
    # the slowest step of a CPU run, so the train step must find every variable already made.
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(16, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
    compile_for_training(
        model, keras.optimizers.Adam(1e-3), loss=keras.losses.CategoricalCrossentropy()
    )
    before = len(model.optimizer.variables)
    # Adam keeps two slots per trainable variable, plus its step counter and learning rate.
    assert before >= 2 * len(model.trainable_variables)
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    y = keras.utils.to_categorical(np.arange(64) % 3, 3)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert len(model.optimizer.variables) == before
    assert int(model.optimizer.iterations.numpy()) == 4
