"""The preprocessing layer saved inside every classifier.

It is registered, so ``keras.models.load_model`` works in safe mode (no ``Lambda`` layers,
nothing unpickled).
"""

from __future__ import annotations

import keras

_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
MODES = ("tf", "caffe", "none")


@keras.saving.register_keras_serializable(package="cars_ml")
class ImagePreprocess(keras.layers.Layer):
    """Turn RGB pixels in [0, 255] into what a backbone expects.

    ``tf`` scales to [-1, 1] (Inception, Xception, MobileNet); ``caffe`` flips to BGR and
    subtracts the ImageNet mean (VGG, ResNet); ``none`` passes pixels through for backbones that
    carry their own preprocessing (MobileNetV3, EfficientNetV2).
    """

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"Unknown preprocessing mode {mode!r}; expected one of {MODES}.")
        self.mode = mode

    def call(self, inputs):
        x = keras.ops.cast(inputs, "float32")
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            x = keras.ops.flip(x, axis=-1)
            return x - keras.ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype="float32")
        return x

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}
