"""Multiply-accumulate count of a Keras model, from its layers' kernel and output shapes."""

from __future__ import annotations

import math

import keras


def _spatial(layer) -> int:
    """Product of the output's dimensions between batch and channels (1 for a Dense on vectors)."""
    return math.prod(int(d) for d in layer.output.shape[1:-1])


def layer_macs(layer) -> int:
    """MACs of one Conv2D, DepthwiseConv2D, SeparableConv2D or Dense layer at batch 1; else 0.

    Every output element of these layers costs one multiply-add per kernel weight feeding it, so
    the count is (kernel weights) x (output positions); bias adds and activations are left out.
    """
    if isinstance(layer, keras.layers.SeparableConv2D):
        depthwise = math.prod(layer.depthwise_kernel.shape)
        pointwise = math.prod(layer.pointwise_kernel.shape)
        return (depthwise + pointwise) * _spatial(layer)
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
        # Conv2D kernel (kh, kw, cin/groups, cout); depthwise (kh, kw, cin, multiplier);
        # Dense (in, units): in each case weights x output positions is the MAC count.
        return math.prod(int(d) for d in layer.kernel.shape) * _spatial(layer)
    return 0


def count_macs(model: keras.Model) -> int:
    """Multiply-adds of one forward pass at batch 1, recursing into nested models (backbones)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_macs(layer)
        else:
            total += layer_macs(layer)
    return total
