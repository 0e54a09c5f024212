"""Multiply-add counts of Keras models, checked by hand and against MobileNet's published count."""

from __future__ import annotations

import keras

from cars_ml.measure.macs import count_macs
from cars_ml.modeling import backbones


def test_counts_conv_depthwise_separable_and_dense_by_hand():
    layers = keras.layers
    inner = keras.Sequential(
        [
            keras.Input((8, 8, 4)),
            layers.DepthwiseConv2D(3, padding="same"),  # 8*8 * 3*3*4 = 2,304
            layers.SeparableConv2D(6, 3, strides=2, padding="same"),  # 4*4 * (3*3*4 + 4*6) = 960
        ]
    )
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(4, 3, strides=2, padding="same")(inputs)  # 8*8 * 3*3*3*4 = 6,912
    x = inner(x)  # nested model: counted recursively
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(5)(x)  # 6*5 = 30
    model = keras.Model(inputs, outputs)
    assert count_macs(model) == 6_912 + 2_304 + 960 + 30


def test_mobilenet_224_matches_its_published_multiply_adds():
    # MobileNet v1 (alpha 1, 224 px): 569 million multiply-adds with its 1000-class classifier
    # (Howard et al. 2017, table 8), i.e. 568 million without that 1024x1000 layer.
    spec = backbones.get_backbone("mobilenet")
    backbone, _ = backbones.build_backbone(spec, 224, "none")
    head = backbones.build_head(backbone.output_shape[-1], 196, 0.0, 0)
    model = backbones.build_classifier(spec, 224, backbone, head)
    macs = count_macs(model)
    assert abs((macs - 1024 * 196) - 568e6) < 1e6, macs
