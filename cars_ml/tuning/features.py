"""Cached backbone features for head-only tuning trials (no MLflow, no Optuna).

A frozen pretrained backbone gives the same pooled features in every trial, so they are
computed once per (backbone, image size, weights, dataset fingerprint), kept on disk, and each
trial trains only its head on them: seconds instead of a pass through the backbone per epoch.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cars_ml.data.pipeline import make_dataset
from cars_ml.data.types import ImageRecord, cache_entry_lock, default_cache_dir

log = logging.getLogger(__name__)


def cache_key(backbone: str, image_size: int, weights_used: str, fingerprint: str) -> str:
    text = f"{backbone}|{image_size}|{weights_used}|{fingerprint}|keras{keras.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def extract(
    backbone: keras.Model,
    records: Sequence[ImageRecord],
    image_size: int,
    preprocess,
    batch_size: int = 64,
) -> np.ndarray:
    """Pooled features of ``records`` (no augmentation) through a compiled forward pass."""
    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32)
    forward = tf.function(lambda x: backbone(preprocess(x), training=False), input_signature=[spec])
    data = make_dataset(records, image_size, batch_size, training=False)
    parts = [forward(images).numpy() for images, _ in data]
    return np.concatenate(parts).astype(np.float32)


def cached_features(
    backbone: keras.Model,
    preprocess,
    splits,
    *,
    name: str,
    image_size: int,
    weights_used: str,
    cache_dir: str | None = None,
) -> tuple[dict[str, np.ndarray], bool]:
    """Train/val features and labels, from disk when present; returns ``(arrays, was_cached)``."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir() / "features"
    path = (
        folder
        / f"{name}-{image_size}-{cache_key(name, image_size, weights_used, splits.fingerprint)}.npz"
    )
    with cache_entry_lock(path):  # workers sharing a study compute the features once
        if path.exists():
            with np.load(path) as data:
                return {k: data[k] for k in data.files}, True
        log.info(
            "Computing %s features at %d px for %d images (cached at %s)",
            name,
            image_size,
            len(splits.train) + len(splits.val),
            path,
        )
        arrays = {
            "train_x": extract(backbone, splits.train, image_size, preprocess),
            "train_y": np.array([r.label for r in splits.train], dtype=np.int32),
            "val_x": extract(backbone, splits.val, image_size, preprocess),
            "val_y": np.array([r.label for r in splits.val], dtype=np.int32),
        }
        # Write then rename, so a killed process never leaves a truncated cache file behind.
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    return arrays, False
