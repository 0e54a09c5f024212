"""Training augmentation as one Keras layer whose randomness comes from an explicit seed.

Keras' random preprocessing layers draw from a stateful seed generator. In a parallel
``tf.data`` map the batches reach that state in a racy order, so a fixed seed no longer
reproduces a run, and a sequential map leaves one core to augment while training waits. Here
each batch carries its own seed (``tf.data.Dataset.random``, new each epoch and reproducible
for a seed), every draw is a stateless op of that seed, and the map runs in parallel.

Flip, translation and zoom are folded into one affine warp per image (one resampling pass
instead of three), followed by a per-image contrast change: the transformations of
``keras.layers.RandomFlip``, ``RandomTranslation``, ``RandomZoom`` and ``RandomContrast``.
"""

from __future__ import annotations

import keras
import tensorflow as tf

# Ranges at strength 1.0, as fractions of the image size (translation) or of 1 (zoom, contrast).
MAX_TRANSLATION = 0.1
MAX_ZOOM = 0.2
MAX_CONTRAST = 0.3


class BatchAugment(keras.layers.Layer):
    """Augment a batch of RGB images in [0, 255] from a ``(2,)`` integer seed.

    ``strength`` (0..1) scales every range; the same images and seed always give the same
    output, whatever thread or order the batches are processed in.
    """

    def __init__(self, strength: float, **kwargs):
        super().__init__(**kwargs)
        if strength < 0:
            raise ValueError(f"augment_strength must be >= 0, got {strength}.")
        self.strength = min(float(strength), 1.0)

    def call(self, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        images = tf.convert_to_tensor(images, tf.float32)
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=5)
        batch = tf.shape(images)[0]
        height = tf.cast(tf.shape(images)[1], tf.float32)
        width = tf.cast(tf.shape(images)[2], tf.float32)
        s = self.strength

        def uniform(index: int, bound: float) -> tf.Tensor:
            return tf.random.stateless_uniform([batch], seeds[index], -bound, bound)

        flip = tf.where(uniform(0, 1.0) < 0.0, -1.0, 1.0)
        zoom = 1.0 + uniform(1, MAX_ZOOM * s)
        shift_x = uniform(2, MAX_TRANSLATION * s) * width
        shift_y = uniform(3, MAX_TRANSLATION * s) * height
        # Output pixel (x, y) samples input (cx + flip*zoom*(x - cx) + dx, cy + zoom*(y - cy) + dy):
        # a zoom about the centre, a horizontal mirror and a shift, in one resampling.
        cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
        scale_x = flip * zoom
        zeros = tf.zeros_like(zoom)
        transforms = tf.stack(
            [
                scale_x,
                zeros,
                cx - scale_x * cx + shift_x,
                zeros,
                zoom,
                cy - zoom * cy + shift_y,
                zeros,
                zeros,
            ],
            axis=1,
        )
        warped = tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=transforms,
            output_shape=tf.shape(images)[1:3],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="REFLECT",
        )
        factor = 1.0 + uniform(4, MAX_CONTRAST * s)
        mean = tf.reduce_mean(warped, axis=(1, 2), keepdims=True)
        contrasted = (warped - mean) * factor[:, None, None, None] + mean
        return tf.clip_by_value(contrasted, 0.0, 255.0)

    def get_config(self) -> dict:
        return {**super().get_config(), "strength": self.strength}
