"""BatchNorm moving statistics for backbones trained from scratch in a few steps.

Inference uses BatchNorm's moving averages, which follow the batch statistics only slowly. A
backbone trained from random weights for an epoch or two ends with averages that still hold
much of their initial values, and inference collapses to one class while training accuracy
climbs. Two remedies, both cheap: a warm-up of the momentum during training (the averages are
bias-corrected from the first step, so short tuning trials score something meaningful) and a
recalibration after training ("precise BN", for the final model).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import keras
import tensorflow as tf

log = logging.getLogger(__name__)

BN_MOMENTUM_FROM_SCRATCH = 0.8
RECALIBRATION_BATCHES = 20


def trainable_batchnorm(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """The model's BatchNorm layers whose moving statistics training updates."""
    return [
        layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]


def warm_momentum(step: int, cap: float) -> float:
    """Momentum for training step ``step`` (from 0): a running mean, capped at ``cap``.

    Step t weighs the new batch by 1/(t+1) until that falls to 1 - ``cap``, so the average
    holds none of its initial value after the first step: with a fixed 0.8, four steps would
    leave 0.8**4 = 41% of it.
    """
    return min(cap, step / (step + 1.0))


class MomentumWarmup(keras.callbacks.Callback):
    """Sets ``layers``' momentum to :func:`warm_momentum` of the global training step.

    The layers read one variable that the traced train step captures, so changing it costs no
    retrace. At the end of training each layer gets its own momentum back (a plain float: what
    its config and a saved model record).
    """

    def __init__(self, layers: Sequence[keras.layers.BatchNormalization], cap: float):
        super().__init__()
        self.layers = list(layers)
        self.cap = cap
        self.step = 0
        self.momentum: tf.Variable | None = None
        self.saved: list = []

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.saved = [layer.momentum for layer in self.layers]
        if self.momentum is None:
            # Created in the model's distribution strategy, so every replica reads the same value.
            with self.model.distribute_strategy.scope():
                self.momentum = tf.Variable(0.0, trainable=False, name="bn_warm_momentum")
        for layer in self.layers:
            layer.momentum = self.momentum

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.momentum.assign(warm_momentum(self.step, self.cap))
        self.step += 1

    def on_train_end(self, logs: dict | None = None) -> None:
        for layer, value in zip(self.layers, self.saved, strict=True):
            layer.momentum = value


def recalibrate_batchnorm(
    model: keras.Model,
    warmup: MomentumWarmup,
    data: tf.data.Dataset,
    class_weight: dict[int, float] | None = None,
) -> int:
    """Re-estimate the moving statistics of ``warmup``'s layers with the final weights.

    Xception after the demo's two epochs scored validation macro-F1 0.02 before and 0.98
    after. Up to ``RECALIBRATION_BATCHES`` unaugmented training batches go through ``model``'s
    own compiled train step at learning rate 0, with the momentum variable that step was traced
    with now uncapped: the averages become the plain mean of those batches' statistics and no
    weight moves. Reusing the traced step costs a backward pass per batch but spares tracing a
    forward graph (Inception-ResNet-v2 at 75 px, 7 batches: 6.0 s instead of 10.9 s on 2
    cores); ``data`` and ``class_weight`` must therefore have the structure training had.
    Returns the number of batches used.
    """
    if not warmup.layers:
        return 0
    if model.optimizer is None or model.train_function is None or warmup.momentum is None:
        raise ValueError(
            "recalibrate_batchnorm needs a model trained with fit() and the MomentumWarmup "
            "callback: its train step must read the warm-up's momentum variable."
        )
    data = data.take(RECALIBRATION_BATCHES)
    count = int(data.cardinality())
    if count < 0:  # Unknown (a filtered dataset, say): count by iterating.
        count = int(data.reduce(0, lambda n, _: n + 1))
    if count == 0:
        return 0
    learning_rate = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    model.optimizer.learning_rate = 0.0
    cap, warmup.cap, warmup.step = warmup.cap, 1.0, 0
    try:
        model.fit(
            data, epochs=1, class_weight=class_weight, callbacks=[warmup], verbose=0, shuffle=False
        )
    finally:
        model.optimizer.learning_rate = learning_rate
        warmup.cap = cap
    layers = len(warmup.layers)
    log.info("Recalibrated %d BatchNorm layers on %d training batches", layers, warmup.step)
    return warmup.step
