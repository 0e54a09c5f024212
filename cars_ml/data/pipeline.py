"""The ``tf.data`` input pipeline: decode, crop, resize, cache, shuffle, augment, batch.

Pixels stay RGB in [0, 255]: every model carries its own preprocessing layer
(``cars_ml.layers.preprocess.ImagePreprocess``), so training, evaluation and serving feed the same
values. Decoded images are cached as uint8 (a quarter of the float32 memory) at the size
training reads them, on disk (``CARS_ML_CACHE/images``), so every epoch and every later step of
a pipeline (features for tuning, fine-tuning, a teacher's outputs, a student, the int8
calibration) reads them instead of decoding every file again; batches are cast to float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from cars_ml.data import image_cache
from cars_ml.data.augment import BatchAugment
from cars_ml.data.types import ImageRecord

AUTOTUNE = tf.data.AUTOTUNE
NO_BOX = (-1, -1, -1, -1)


def labels_array(records: Sequence[ImageRecord]) -> np.ndarray:
    """The records' labels as an int32 vector."""
    return np.asarray([r.label for r in records], dtype=np.int32)


def _decode(path: tf.Tensor, box: tf.Tensor, image_size: int) -> tf.Tensor:
    """Read one file, decode to 3 channels, crop to ``box`` if set, resize; uint8 (s, s, 3)."""
    raw = tf.io.read_file(path)
    # INTEGER_ACCURATE is the IDCT that PIL (serving) uses: training then sees the very pixels
    # serving decodes. decode_image's default fast IDCT differs by up to 19 grey levels.
    image = tf.cond(
        tf.io.is_jpeg(raw),
        lambda: tf.io.decode_jpeg(raw, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(raw, channels=3, expand_animations=False),
    )
    image.set_shape([None, None, 3])

    def crop() -> tf.Tensor:
        # Boxes are inclusive pixel coordinates, already clamped by the loader; clamp again so
        # a file edited since loading cannot crash the pipeline.
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        x1 = tf.clip_by_value(box[0], 0, width - 1)
        y1 = tf.clip_by_value(box[1], 0, height - 1)
        x2 = tf.clip_by_value(box[2], x1, width - 1)
        y2 = tf.clip_by_value(box[3], y1, height - 1)
        return tf.image.crop_to_bounding_box(image, y1, x1, y2 - y1 + 1, x2 - x1 + 1)

    image = tf.cond(box[0] >= 0, crop, lambda: image)
    # Antialiasing only changes a downscale. An upscale gives the same pixels (within rounding)
    # without it, through a kernel about 6x faster, so small images skip it.
    shrinks = tf.reduce_any(tf.shape(image)[:2] > image_size)
    image = tf.cond(
        shrinks,
        lambda: tf.image.resize(image, (image_size, image_size), antialias=True),
        lambda: tf.image.resize(image, (image_size, image_size), antialias=False),
    )
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _decoded(records: Sequence[ImageRecord], image_size: int) -> tf.data.Dataset:
    """Unbatched ``(uint8 image, int32 label)`` pairs in record order."""
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}.")
    if not records:
        raise ValueError("No records to build a dataset from; check the dataset split.")
    paths = [r.path for r in records]
    boxes = np.asarray([r.bbox or NO_BOX for r in records], dtype=np.int32)
    ds = tf.data.Dataset.from_tensor_slices((paths, boxes, labels_array(records)))
    return ds.map(
        lambda path, box, label: (_decode(path, box, image_size), label),
        num_parallel_calls=AUTOTUNE,
    )


def make_dataset(
    records: Sequence[ImageRecord],
    image_size: int,
    batch_size: int,
    *,
    training: bool,
    augment_strength: float = 0.0,
    shuffle_seed: int = 0,
    cache: bool = True,
    targets: np.ndarray | None = None,
) -> tf.data.Dataset:
    """Batches of ``(float32 RGB images in [0, 255] (b, s, s, 3), int32 labels)``, or with
    ``targets`` (one row per record, a teacher's probabilities say) ``(images, labels,
    targets)``: each record's row travels with it through the shuffle.

    Training shuffles (seeded, reshuffled every epoch) and, with ``augment_strength > 0``,
    augments each batch so each epoch sees new variants. Evaluation keeps record order.
    ``cache`` reads the decoded images from the disk cache (made on first use) when they fit
    its budget; otherwise, or with ``cache=False``, every pass decodes the files.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if augment_strength < 0:
        raise ValueError(f"augment_strength must be >= 0, got {augment_strength}.")
    if not records:
        raise ValueError("No records to build a dataset from; check the dataset split.")
    if targets is not None and len(targets) != len(records):
        raise ValueError(f"{len(targets)} target rows for {len(records)} records.")
    if cache and image_cache.fits(len(records), image_size):
        ds = _from_array(load_images_array(records, image_size), labels_array(records))
    else:
        ds = _decoded(records, image_size)
    if targets is not None:
        extra = tf.data.Dataset.from_tensor_slices(np.asarray(targets, np.float32))
        ds = tf.data.Dataset.zip(ds, extra).map(lambda pair, t: (*pair, t))
    if training:
        ds = ds.shuffle(len(records), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda x, *rest: (tf.cast(x, tf.float32), *rest))
    if training and augment_strength > 0:
        augment = BatchAugment(augment_strength, name="augment")
        # One seed per batch, a new sequence every epoch, the same sequences for the same
        # shuffle_seed: the parallel map then reproduces a run exactly.
        seeds = tf.data.Dataset.random(seed=shuffle_seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip(ds, seeds.batch(2)).map(
            lambda batch, seed: (augment(batch[0], seed), *batch[1:]),
            num_parallel_calls=AUTOTUNE,
        )
    return ds.prefetch(AUTOTUNE)


def _from_array(images: np.ndarray, labels: np.ndarray) -> tf.data.Dataset:
    """Unbatched ``(uint8 image, int32 label)`` pairs read from decoded images in memory."""
    return tf.data.Dataset.from_tensor_slices((np.asarray(images), labels))


def decode_images(records: Sequence[ImageRecord], image_size: int) -> np.ndarray:
    """Every record decoded, cropped and resized, as uint8 ``(n, s, s, 3)`` in record order."""
    if not records:
        return np.zeros((0, image_size, image_size, 3), dtype=np.uint8)
    batches = [x.numpy() for x, _ in _decoded(records, image_size).batch(256)]
    return np.concatenate(batches, axis=0)


def load_images_array(records: Sequence[ImageRecord], image_size: int) -> np.ndarray:
    """All records decoded like the pipeline does, as uint8 ``(n, s, s, 3)`` in record order:
    from the disk cache when it holds them (decoded and stored there once when they fit its
    budget), else decoded now."""
    if not records:
        return np.zeros((0, image_size, image_size, 3), dtype=np.uint8)
    if not image_cache.fits(len(records), image_size):
        return decode_images(records, image_size)
    return image_cache.cached(records, image_size, decode_images)
