"""Plain value types shared by every dataset layout (no TensorFlow, no MLflow)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cars_ml.params import fraction, non_negative_int, param


class DataError(ValueError):
    """A dataset problem the user must fix; the message names the file and the fix."""


class DataWarning(UserWarning):
    """Something the user should know about a dataset that does not stop the run."""


def default_cache_dir() -> Path:
    """Folder for generated data and cached features (``CARS_ML_CACHE`` overrides it)."""
    return Path(os.environ.get("CARS_ML_CACHE", Path.home() / ".cache" / "cars_ml"))


@contextlib.contextmanager
def cache_entry_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for the cache entry ``path`` (a ``.lock`` file beside it).

    Processes that want the same entry at once (the pipeline's workers sharing a study) then
    compute it once: the first writes it while the others wait, then read it. The kernel
    releases the lock of a process that dies, so a killed writer blocks nobody.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image: absolute path, 0-based class index, optional crop box.

    ``bbox`` is ``(x1, y1, x2, y2)`` in pixels, already clamped to the image and valid
    (x1 < x2, y1 < y2); ``None`` means use the whole image.
    """

    path: str
    label: int
    bbox: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class DataConfig:
    """How to find, check and split a dataset.

    ``data`` is ``"synthetic"`` (the embedded default), a Stanford Cars root, or an image-folder
    root. ``max_classes`` keeps the most frequent classes (0 keeps all); ``max_per_class``
    caps images per class (0 means no cap) so demos and CI stay fast.
    """

    data: str = param("synthetic", "synthetic, a Stanford Cars root or an image-folder root")
    val_fraction: float = param(0.15, "share of the images for validation", parse=fraction)
    test_fraction: float = param(0.15, "held-out test share", parse=fraction)
    seed: int = param(
        42, "seed of the split, the sampling and the training", parse=non_negative_int
    )
    crop_to_bbox: bool = param(True, "crop Stanford Cars images to their annotated boxes")
    skip_bad_images: bool = param(False, "skip unreadable images (listed) instead of stopping")
    max_classes: int = param(0, "keep the most frequent classes (0: all)", parse=non_negative_int)
    max_per_class: int = param(
        0,
        "images per class at most (0: no cap; the main pipeline then takes 28 on synthetic data)",
        parse=non_negative_int,
    )
    cache_dir: str = ""

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 0.5:
                raise ValueError(f"{name}={value} must be between 0 and 0.5 (exclusive).")
        for name in ("max_classes", "max_per_class"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{name} must be >= 0 (0 means no limit), got {getattr(self, name)}."
                )


@dataclass(frozen=True)
class DatasetSplits:
    """A validated dataset split three ways, with provenance for MLflow."""

    name: str
    layout: str  # "stanford_cars" or "image_folder"
    root: str
    class_names: tuple[str, ...]
    train: tuple[ImageRecord, ...]
    val: tuple[ImageRecord, ...]
    test: tuple[ImageRecord, ...]
    test_source: str  # "official", "folder" or "held_out"
    fingerprint: str
    skipped: tuple[str, ...] = field(default_factory=tuple)  # "path: reason"
    bbox_fallbacks: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def summary(self) -> dict[str, int]:
        """Counts logged as MLflow metrics by ``prepare_data`` and ``train``."""
        return {
            "num_classes": self.num_classes,
            "num_images": len(self.train) + len(self.val) + len(self.test),
            "num_train_images": len(self.train),
            "num_val_images": len(self.val),
            "num_test_images": len(self.test),
            "num_skipped_images": self.num_skipped,
        }

    def params(self) -> dict[str, str]:
        """Provenance logged as MLflow params (how the split was made, not just counts)."""
        return {
            "dataset": self.name,
            "dataset_layout": self.layout,
            "dataset_fingerprint": self.fingerprint,
            "num_classes": str(self.num_classes),
            "test_split": self.test_source,
        }


@dataclass
class LayoutData:
    """What a layout reader (Stanford Cars, image folder) found, before selection and splitting.

    ``test`` is ``None`` when the layout has no labelled test set. ``bbox_fallback_paths`` are
    images whose annotated box did not fit, so they are used whole.
    """

    layout: str
    root: str
    class_names: list[str]
    train: list[ImageRecord]
    test: list[ImageRecord] | None
    test_source: str
    skipped: list[str] = field(default_factory=list)
    bbox_fallback_paths: set[str] = field(default_factory=set)
