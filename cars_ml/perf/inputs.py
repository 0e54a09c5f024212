"""What the benchmarks run on: real Stanford Cars material beside the project, or stand-ins.

``../shared/data`` (beside the project root) holds three real 224x224 photos and 4,000 real
low-resolution training images. A fresh clone has no such folder; then a synthetic car photo
and the generated synthetic dataset take their place, and the run records which was used.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cars_ml.data import stanford_cars, synthetic
from cars_ml.data.types import ImageRecord
from cars_ml.serving.decode import decode_image_bytes, resize_rgb

DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LOWRES = "stanford_cars_lowres"
NUM_CLASSES = 196


def shared_data_dir(override: str = "") -> Path | None:
    """``override`` or ``../shared/data`` beside the project, if it exists."""
    root = Path(override).expanduser() if override else DEFAULT_SHARED_DATA
    if override and not root.is_dir():
        raise ValueError(
            f"data_dir={override!r} is not a folder; pass ../shared/data or leave it empty."
        )
    return root if root.is_dir() else None


def sample_photo(data_dir: Path | None, workdir: Path) -> tuple[Path, str]:
    """One real Stanford Cars photo, or a synthetic car JPEG written into ``workdir``.

    Returns ``(path, source)`` with ``source`` ``real`` or ``synthetic``.
    """
    photos = sorted((data_dir / "samples").glob("*.jpg")) if data_dir else []
    if photos:
        return photos[0], "real"
    pixels, _ = synthetic.draw_car(0, 224, 224, np.random.default_rng(0))
    path = Path(workdir) / "synthetic_car.jpg"
    Image.fromarray(pixels).save(path, quality=90)
    return path, "synthetic"


def photo_pixels(path: Path, image_size: int) -> np.ndarray:
    """uint8 ``(s, s, 3)`` pixels of ``path`` decoded and resized exactly as serving does."""
    image = decode_image_bytes(Path(path).read_bytes(), max_pixels=40_000_000)
    return resize_rgb(image, image_size)


def file_base64(path: Path) -> str:
    """The file's bytes as base64 text: the body of one serving request."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


@dataclass(frozen=True)
class ImageSet:
    """Training records of the benchmark dataset and where they came from."""

    records: tuple[ImageRecord, ...]
    class_names: tuple[str, ...]
    root: str
    source: str  # "stanford_cars_lowres" or "synthetic"


def image_set(data_dir: Path | None, max_images: int, cache_dir: str | None = None) -> ImageSet:
    """Up to ``max_images`` training records of the real low-resolution set, else synthetic.

    Images are used whole (no bounding-box crop): the low-resolution copies' boxes are in the
    original pixel coordinates, and a benchmark should time the same work for every image.
    """
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}.")
    lowres = data_dir / LOWRES if data_dir else None
    if lowres is not None and (lowres / "devkit").is_dir():
        root, source = lowres, LOWRES
    else:
        root, source = synthetic.ensure_synthetic(cache_dir), "synthetic"
    layout = stanford_cars.load_stanford_cars(root, crop_to_bbox=False)
    return ImageSet(tuple(layout.train[:max_images]), tuple(layout.class_names), str(root), source)


def car_class_names(data_dir: Path | None) -> list[str]:
    """The 196 real Stanford Cars class names, or numbered placeholders without the devkit."""
    meta = data_dir / LOWRES / "devkit" / stanford_cars.META if data_dir else None
    if meta is not None and meta.is_file():
        names = stanford_cars.read_class_names(meta)
        if len(names) == NUM_CLASSES:
            return names
    return [f"class {i + 1:03d}" for i in range(NUM_CLASSES)]


def representative_images(photo: Path, records, image_size: int, n: int = 32) -> np.ndarray:
    """uint8 calibration images for int8 export: the photo plus up to ``n - 1`` dataset images."""
    images = [photo_pixels(photo, image_size)]
    for record in list(records)[: max(0, n - 1)]:
        images.append(photo_pixels(Path(record.path), image_size))
    return np.stack(images)
