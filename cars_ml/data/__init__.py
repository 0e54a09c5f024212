"""The data layer: Stanford Cars devkit, image folders, the synthetic default, tf.data input."""

from cars_ml.data.loader import load_dataset
from cars_ml.data.pipeline import load_images_array, make_dataset
from cars_ml.data.types import DataConfig, DataError, DatasetSplits, ImageRecord

__all__ = [
    "DataConfig",
    "DataError",
    "DatasetSplits",
    "ImageRecord",
    "load_dataset",
    "load_images_array",
    "make_dataset",
]
