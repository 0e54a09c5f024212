"""Training augmentation as one Keras layer whose randomness comes from an explicit seed.

Keras' random preprocessing layers draw from a stateful seed generator. In a parallel
``tf.data`` map the batches reach that state in a racy order, so a fixed seed no longer
reproduces a run, and a sequential map leaves one core to augment while training waits. Here
each batch carries its own seed (``tf.data.Dataset.random``, new each epoch and reproducible
for a seed), every draw is a stateless op of that seed, and the map runs in parallel.

The geometric part is a random resized crop with a horizontal flip: a box of random area and
aspect ratio, mirrored half of the time, resampled to the full size by one
``crop_and_resize`` over the whole batch. A per-image brightness, contrast and saturation change
follows. With few photos per class, crops that keep most of the car and show it at other
scales and positions are what lets fine-tuning generalise (docs/real-data.md measures it).
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

# Ranges at strength 1.0: the smallest crop (share of the image's area), the aspect-ratio
# change (log scale), brightness (share of the pixel range), contrast and saturation factors.
MIN_CROP_AREA = 0.35
MAX_LOG_ASPECT = math.log(4 / 3)
MAX_BRIGHTNESS = 0.1
MAX_CONTRAST = 0.2
MAX_SATURATION = 0.2


class BatchAugment(keras.layers.Layer):
    """Augment a batch of RGB images in [0, 255] from a ``(2,)`` integer seed.

    ``strength`` (0..1) scales every range (the flip stays at one image in two); the same
    images and seed always give the same output, whatever thread or order the batches are
    processed in.
    """

    def __init__(self, strength: float, **kwargs):
        super().__init__(**kwargs)
        if strength < 0:
            raise ValueError(f"augment_strength must be >= 0, got {strength}.")
        self.strength = min(float(strength), 1.0)

    def call(self, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        images = tf.convert_to_tensor(images, tf.float32)
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=8)
        batch = tf.shape(images)[0]
        s = self.strength

        def uniform(index: int, low: float, high: float) -> tf.Tensor:
            return tf.random.stateless_uniform([batch], seeds[index], low, high)

        area = uniform(0, 1.0 - (1.0 - MIN_CROP_AREA) * s, 1.0)
        aspect = tf.exp(uniform(1, -MAX_LOG_ASPECT * s, MAX_LOG_ASPECT * s))
        width = tf.minimum(tf.sqrt(area * aspect), 1.0)
        height = tf.minimum(tf.sqrt(area / aspect), 1.0)
        left = uniform(2, 0.0, 1.0) * (1.0 - width)
        top = uniform(3, 0.0, 1.0) * (1.0 - height)
        # A box whose x1 lies right of its x2 is sampled mirrored: crop and flip in one pass.
        flip = uniform(4, 0.0, 1.0) < 0.5
        x1 = tf.where(flip, left + width, left)
        x2 = tf.where(flip, left, left + width)
        boxes = tf.stack([top, x1, top + height, x2], axis=1)
        size = tf.shape(images)[1:3]
        out = tf.image.crop_and_resize(images, boxes, tf.range(batch), size)

        def factor(index: int, bound: float) -> tf.Tensor:
            return uniform(index, 1.0 - bound * s, 1.0 + bound * s)[:, None, None, None]

        mean = tf.reduce_mean(out, axis=(1, 2, 3), keepdims=True)
        out = (out - mean) * factor(5, MAX_CONTRAST) + mean
        out += (factor(6, MAX_BRIGHTNESS) - 1.0) * 255.0
        grey = tf.reduce_mean(out, axis=3, keepdims=True)
        out = (out - grey) * factor(7, MAX_SATURATION) + grey
        return tf.clip_by_value(out, 0.0, 255.0)

    def get_config(self) -> dict:
        return {**super().get_config(), "strength": self.strength}
