"""Data layer: dataset layouts, validation, splitting and the tf.data pipeline.

The loaders and the tf.data helpers are imported lazily: loading and checking a dataset does not
import TensorFlow (seconds of start-up the ``prepare_data`` step does not need), and an entry
point reads ``DataConfig`` to build its parser without importing either.
"""

from __future__ import annotations

from cars_ml.data.types import DataConfig, DataError, DatasetSplits, DataWarning, ImageRecord

__all__ = [
    "DataConfig",
    "DataError",
    "DataWarning",
    "DatasetSplits",
    "ImageRecord",
    "labels_array",
    "load_dataset",
    "load_images_array",
    "make_dataset",
    "train_subset",
]
_PIPELINE = ("labels_array", "load_images_array", "make_dataset")
_LOADER = ("load_dataset", "train_subset")


def __getattr__(name: str):
    if name in _PIPELINE:
        from cars_ml.data import pipeline

        return getattr(pipeline, name)
    if name in _LOADER:
        from cars_ml.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
