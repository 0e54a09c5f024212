"""Quantization-aware training: a twin of a Keras model that computes what its int8 file will.

The twin shares every layer (and so every weight) with the model it is made from, and differs
in two ways:

- every convolution and dense layer uses its kernel rounded to int8, per output channel and
  symmetric, as the TFLite converter stores it (BatchNorm folds into the kernel by a factor per
  output channel, which per-channel rounding does not see);
- every tensor that the int8 file holds as int8 (what a convolution, a dense layer, an addition
  or a pooling reads, and the logits) is rounded to 256 steps between the minimum and maximum
  that ``calibrate`` measured, as TensorFlow's calibrator does for the export.

Training the twin for an epoch or two at a low learning rate moves the weights to where int8
rounding changes fewer answers (straight-through gradients); the float model that shares them
is then exported and calibrated as usual (``cars_ml.export``).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

# Layers whose inputs the int8 file does not hold as int8 tensors of their own: BatchNorm and
# activations fold into the layer before them, and the pixel scaling runs on the input.
_FUSED = (
    keras.layers.BatchNormalization,
    keras.layers.ReLU,
    keras.layers.Activation,
    keras.layers.Rescaling,
    keras.layers.InputLayer,
    keras.Model,  # a nested model rounds its own inputs where its layers read them
)
# Layers that pass values through unchanged at inference: their input is rounded, and their
# output counts as rounded already.
_PASS_THROUGH = (keras.layers.Dropout,)
_WEIGHTED = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)


class FakeQuant(keras.layers.Layer):
    """Rounds a tensor to 256 steps between a measured minimum and maximum (zero exact).

    While ``observing`` it passes values through and widens its range to cover them; the
    range is then fixed, as in the exported int8 file.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.observing = False

    def build(self, input_shape):
        self.low = self.add_weight(name="low", shape=(), initializer="zeros", trainable=False)
        self.high = self.add_weight(name="high", shape=(), initializer="zeros", trainable=False)

    def call(self, x):
        if self.observing:
            self.low.assign(tf.minimum(self.low, tf.reduce_min(x)))
            self.high.assign(tf.maximum(self.high, tf.reduce_max(x)))
            return x
        return tf.quantization.fake_quant_with_min_max_vars(x, self.low, self.high, num_bits=8)


def fake_quant_kernel(kernel: tf.Tensor) -> tf.Tensor:
    """``kernel`` rounded to int8 per output channel (its last axis), symmetric in
    [-127, 127], with straight-through gradients."""
    flat = tf.reshape(kernel, [-1, kernel.shape[-1]])
    bound = tf.stop_gradient(tf.maximum(tf.reduce_max(tf.abs(flat), axis=0), 1e-8))
    rounded = tf.quantization.fake_quant_with_min_max_vars_per_channel(
        flat, -bound, bound, num_bits=8, narrow_range=True
    )
    return tf.reshape(rounded, tf.shape(kernel))


class QuantizedWeights(keras.layers.Layer):
    """Runs a convolution or dense layer with its kernel rounded to int8; the layer's own
    weights train. The activation is left to the caller (the logits are rounded before a
    softmax)."""

    def __init__(self, layer: keras.layers.Layer, **kwargs):
        super().__init__(name=f"{layer.name}_int8", **kwargs)
        self.layer = layer

    def call(self, x):
        layer = self.layer
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            # One channel per input channel and multiplier, as the int8 file stores them.
            kh, kw, channels, multiplier = layer.kernel.shape
            kernel = fake_quant_kernel(tf.reshape(layer.kernel, [kh, kw, channels * multiplier]))
            kernel = tf.reshape(kernel, [kh, kw, channels, multiplier])
            y = keras.ops.depthwise_conv(
                x,
                kernel,
                strides=layer.strides,
                padding=layer.padding,
                data_format=layer.data_format,
                dilation_rate=layer.dilation_rate,
            )
        elif isinstance(layer, keras.layers.Conv2D):
            y = layer.convolution_op(x, fake_quant_kernel(layer.kernel))
        else:
            y = tf.matmul(x, fake_quant_kernel(layer.kernel))
        return y + layer.bias if layer.use_bias else y


def twin(model: keras.Model) -> keras.Model:
    """The quantization-aware twin of ``model`` (a functional model; nested functional models
    are followed). It shares ``model``'s layers: training it trains ``model``."""
    quantized: dict[int, object] = {}

    def rounded(tensor):
        if not isinstance(tensor, keras.KerasTensor) or tensor.sparse:
            # A constant (the 3 of a hard swish), or one of the squeeze-and-excitation tensors
            # that Keras marks sparse in MobileNetV3: the rounding op takes dense tensors.
            return tensor
        if id(tensor) not in quantized:
            out = FakeQuant()(tensor)
            quantized[id(tensor)] = quantized[id(out)] = out
        return quantized[id(tensor)]

    def call(layer, *args, **kwargs):
        if not isinstance(layer, _FUSED):
            args = tuple(keras.tree.map_structure(rounded, a) for a in args)
        if not isinstance(layer, _WEIGHTED):
            out = layer(*args, **kwargs)
            if isinstance(layer, _PASS_THROUGH):
                quantized[id(out)] = out
            return out
        out = QuantizedWeights(layer)(*args)
        if layer.activation is keras.activations.softmax:
            return keras.layers.Softmax()(rounded(out))
        return layer.activation(out) if layer.activation is not keras.activations.linear else out

    return keras.models.clone_model(
        model, clone_function=lambda layer: layer, call_function=call, recursive=True
    )


def fake_quant_layers(model: keras.Model) -> list[FakeQuant]:
    """Every ``FakeQuant`` layer of ``model`` and of the models nested in it."""
    found = []
    for layer in model.layers:
        if isinstance(layer, FakeQuant):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found.extend(fake_quant_layers(layer))
    return found


def calibrate(model: keras.Model, batches) -> int:
    """Set every rounding range of the twin ``model`` to the minimum and maximum its tensors
    reach on ``batches`` (images, or ``(images, ...)`` tuples) with activations unrounded, as
    TensorFlow's calibrator does for the export (kernels stay rounded here; a test checks that
    the steps still match the file's). Returns the number of ranges set."""
    layers = fake_quant_layers(model)
    for layer in layers:
        layer.low.assign(0.0)
        layer.high.assign(0.0)
        layer.observing = True
    try:
        # Traced here, with the layers observing; training traces its own function later.
        run = tf.function(lambda x: model(x, training=False))
        for batch in batches:
            run(batch[0] if isinstance(batch, tuple) else batch)
    finally:
        for layer in layers:
            layer.observing = False
    empty = [layer.name for layer in layers if float(layer.high.numpy() - layer.low.numpy()) <= 0]
    if empty:
        raise ValueError(
            f"calibration left {len(empty)} int8 range(s) empty ({', '.join(empty[:3])}); "
            "calibrate on at least one batch of images."
        )
    return len(layers)


def ranges(model: keras.Model) -> np.ndarray:
    """The ``(low, high)`` range of every rounding point of the twin ``model``."""
    return np.array(
        [(float(q.low.numpy()), float(q.high.numpy())) for q in fake_quant_layers(model)]
    )
