"""Reader for class-per-folder image trees.

Two shapes are accepted::

    root/<class>/*.jpg|jpeg|png                         one pool; we split it
    root/train/<class>/...  (+ root/test/<class>/...)   test/ is the test set when present
"""

from __future__ import annotations

import logging
from pathlib import Path

from cars_ml.data.types import DataError, ImageRecord, LayoutData

log = logging.getLogger(__name__)

LAYOUT = "image_folder"
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
EXPECTED = "root/<class>/*.jpg|jpeg|png, or root/train/<class>/ plus root/test/<class>/"


def _class_dirs(folder: Path) -> list[Path]:
    # Hidden folders (.ipynb_checkpoints, .git, ...) are never classes.
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def is_image_folder(root: Path) -> bool:
    """True when ``root`` looks like either image-folder shape (a class folder holds an image)."""
    if not root.is_dir():
        return False
    pool = root / "train" if (root / "train").is_dir() else root
    return any(_images(d) for d in _class_dirs(pool))


def load_image_folder(root: Path) -> LayoutData:
    """Read class names (sorted folder names) and records; labels follow the sorted names.

    Raises ``DataError`` when there are no class folders or a test class has no training folder.
    """
    split = (root / "train").is_dir()
    train_root = root / "train" if split else root
    train_dirs = {d.name: d for d in _class_dirs(train_root)}
    test_dirs = {d.name: d for d in _class_dirs(root / "test")} if (root / "test").is_dir() else {}
    unknown = sorted(set(test_dirs) - set(train_dirs))
    if unknown:
        raise DataError(
            f"{root / 'test'} has class folders with no training folder in {train_root}: "
            f"{unknown[:5]}. Add {train_root}/<class>/ images for them or remove them from test/."
        )
    class_names = sorted(train_dirs)
    if not class_names:
        raise DataError(f"{train_root} has no class folders. Expected {EXPECTED}.")
    train = _folder_records(train_dirs, class_names)
    test = _folder_records(test_dirs, class_names) if test_dirs else None
    return LayoutData(
        layout=LAYOUT,
        root=str(root),
        class_names=class_names,
        train=train,
        test=test,
        test_source="folder" if test is not None else "held_out",
    )


def _folder_records(dirs: dict[str, Path], class_names: list[str]) -> list[ImageRecord]:
    # An empty class folder is kept as a class here; the loader rejects classes without images
    # after ``max_classes`` had the chance to drop them.
    records = []
    for label, name in enumerate(class_names):
        if name in dirs:
            records.extend(ImageRecord(str(p), label) for p in _images(dirs[name]))
    return records
