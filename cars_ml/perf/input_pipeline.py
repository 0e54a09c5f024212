"""Input pipeline: our ``tf.data`` pipeline vs a per-image PIL loop, and data wait in training."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cars_ml.data.types import ImageRecord


def seed_loader(records: Sequence[ImageRecord], image_size: int, batch_size: int):
    """The original work's loader: per image open, convert to RGB, resize, ``np.asarray``;
    yields stacked float32 batches and their labels."""
    images, labels = [], []
    for record in records:
        with Image.open(record.path) as image:
            pixels = image.convert("RGB").resize((image_size, image_size))
        images.append(np.asarray(pixels, dtype=np.float32))
        labels.append(record.label)
        if len(images) == batch_size:
            yield np.stack(images), np.asarray(labels, dtype=np.int32)
            images, labels = [], []
    if images:
        yield np.stack(images), np.asarray(labels, dtype=np.int32)


def _images_per_second(batches) -> float:
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in batches)
    return count / (time.perf_counter() - start)


def loader_throughput(
    records: Sequence[ImageRecord], *, image_size: int, batch_size: int = 32, rounds: int = 2
) -> dict[str, float]:
    """Images per second of both loaders over ``records`` (float32 batches either way), and of
    our pipeline reading its cache (what every training epoch after the first does).

    The loaders take turns for ``rounds`` rounds and each keeps its best round: on a machine
    shared with other jobs the fastest pass is the one least disturbed by them.
    """
    from cars_ml.data.pipeline import make_dataset

    for record in records:  # Both loaders then read from the page cache, not the disk.
        Path(record.path).read_bytes()
    dataset = make_dataset(records, image_size, batch_size, training=False, cache=False)
    for _ in dataset.take(1):  # Builds the pipeline's graph functions before the clock runs.
        pass
    # What training reads from its second epoch on: the decoded images, cached once.
    cached = make_dataset(records, image_size, batch_size, training=False, cache=True)
    for _ in cached:
        pass
    ours, seed, warm = [], [], []
    for _ in range(max(1, rounds)):
        seed.append(_images_per_second(seed_loader(records, image_size, batch_size)))
        ours.append(_images_per_second((x, y.numpy()) for x, y in dataset))
        warm.append(_images_per_second((x, y.numpy()) for x, y in cached))
    return {
        "pipeline_img_per_s": max(ours),
        "seed_loader_img_per_s": max(seed),
        "pipeline_speedup_vs_seed_loader": max(ours) / max(seed),
        "pipeline_cached_img_per_s": max(warm),
        "pipeline_cached_speedup_vs_seed_loader": max(warm) / max(seed),
    }


def _interleaved_epoch(model, fed, memory, chunk: int) -> tuple[float, float, int]:
    """One epoch of ``fed`` in chunks of ``chunk`` training steps, each followed by as many
    steps on ``memory``; returns (seconds on the pipeline, seconds in memory, steps).

    Taking turns every few steps lets load from other processes hit both feeds alike, while the
    pipeline keeps one iterator, so it must still keep pace with training to avoid a wait.
    """
    pipeline_s = memory_s = 0.0
    steps = 0
    batches, held = iter(fed), iter(memory)
    while True:
        start = time.perf_counter()
        done = 0
        for x, y in itertools.islice(batches, chunk):
            model.train_on_batch(x, y)
            done += 1
        pipeline_s += time.perf_counter() - start
        if not done:
            return pipeline_s, memory_s, steps
        start = time.perf_counter()
        for x, y in itertools.islice(held, done):
            model.train_on_batch(x, y)
        memory_s += time.perf_counter() - start
        steps += done


def data_wait(
    records: Sequence[ImageRecord],
    *,
    image_size: int = 96,
    batch_size: int = 32,
    max_steps: int = 0,
    chunk: int = 10,
) -> dict[str, float]:
    """Share of training time spent waiting for data: EfficientNet-Lite0 steps fed by the train
    step's own pipeline (decoded-image cache, shuffle, the default augmentation) vs the same
    steps on batches already in memory, taking turns every ``chunk`` steps.

    ``data_wait_fraction`` is an epoch that decodes every file as it goes (a dataset too large
    for the cache, the worst case); ``data_wait_fraction_cached`` one that reads the decoded
    images, as training does from the cache. The backbone is frozen as in
    the head phase of pretrained training: the cheapest step the product takes, so the one where
    a slow pipeline would show first. ``max_steps`` > 0 shortens the epoch.
    """
    from cars_ml.data.pipeline import make_dataset
    from cars_ml.training.hparams import HParams

    if max_steps:
        records = list(records)[: max_steps * batch_size]
    model = _frozen_lite0(image_size, max(r.label for r in records) + 1)

    def fed(cache: bool):
        return make_dataset(
            records,
            image_size,
            batch_size,
            training=True,
            augment_strength=HParams().augment_strength,
            cache=cache,
        )

    memory = _in_memory_batches(records[: 8 * batch_size], image_size, batch_size)
    for xb, yb in memory.take(2):  # Traces the train step before any clock runs.
        model.train_on_batch(xb, yb)
    metrics = {}
    for suffix, cache in (("", False), ("_cached", True)):
        # Decoded images come from the disk cache (filled before the clock runs), else every
        # file is decoded while training waits for it.
        pipeline_s, memory_s, steps = _interleaved_epoch(model, fed(cache), memory, chunk)
        metrics[f"train_step_ms_pipeline{suffix}"] = pipeline_s / steps * 1000.0
        metrics[f"train_step_ms_in_memory{suffix}"] = memory_s / steps * 1000.0
        metrics[f"data_wait_fraction{suffix}"] = max(0.0, 1.0 - memory_s / pipeline_s)
    return metrics


def _frozen_lite0(image_size: int, num_classes: int):
    """EfficientNet-Lite0 with its backbone frozen and a head, compiled as training does."""
    import keras

    from cars_ml.modeling import backbones
    from cars_ml.modeling.optimizers import FusedAdam
    from cars_ml.training.fit import compile_for_training

    keras.utils.set_random_seed(0)
    spec = backbones.get_backbone("efficientnet_lite0")
    backbone, _ = backbones.build_backbone(spec, image_size, "none")
    backbone.trainable = False
    head = backbones.build_head(backbone.output_shape[-1], num_classes, 0.3, 0)
    model = backbones.build_classifier(spec, image_size, backbone, head)
    compile_for_training(model, FusedAdam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy())
    return model


def _in_memory_batches(records, image_size: int, batch_size: int):
    """Batches already decoded, cast and batched, repeated: the feed that never waits."""
    import tensorflow as tf

    from cars_ml.data.pipeline import make_dataset

    sample = make_dataset(records, image_size, batch_size, training=False, cache=False)
    held = list(sample)
    x = tf.concat([b[0] for b in held], axis=0)
    y = tf.concat([b[1] for b in held], axis=0)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).repeat()


def compare_pipeline(
    records: Sequence[ImageRecord],
    *,
    image_size: int = 224,
    batch_size: int = 32,
    train_image_size: int = 96,
    train_steps: int = 0,
    rounds: int = 2,
) -> dict[str, float]:
    """Loader throughput at ``image_size``; data wait of training epochs at ``train_image_size``
    (``train_steps`` > 0 caps those epochs)."""
    if not records:
        raise ValueError("no images to benchmark the input pipeline on.")
    metrics = loader_throughput(
        records, image_size=image_size, batch_size=batch_size, rounds=rounds
    )
    metrics.update(
        data_wait(
            records, image_size=train_image_size, batch_size=batch_size, max_steps=train_steps
        )
    )
    return metrics
