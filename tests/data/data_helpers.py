"""Helpers for the data-layer tests (importable: pytest puts this folder on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cars_ml.data.synthetic import SyntheticSpec

# 3 classes x 6 train (+3 test) images of 48x32 px: enough for a stratified 3-way split.
SMALL = SyntheticSpec(num_classes=3, train_per_class=6, test_per_class=3, width=48, height=32)


def write_image(path: Path, size=(32, 24), mode: str = "RGB", seed: int = 0, fmt=None) -> Path:
    """A small noisy image at ``path`` (parents created) in ``mode`` / ``fmt``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt)
    return path
