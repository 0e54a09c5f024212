"""Small datasets for the data-layer tests, built in tmp_path in a few milliseconds."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import SMALL, write_image

from cars_ml.data.synthetic import generate


@pytest.fixture()
def small_cars(tmp_path) -> Path:
    """A fresh devkit-layout root (synthetic content) that a test may damage."""
    root = tmp_path / "cars"
    generate(root, SMALL)
    return root


@pytest.fixture()
def small_folder(tmp_path) -> Path:
    """``root/<class>/*.jpg`` with 3 classes of 5 images."""
    root = tmp_path / "folder"
    for c, name in enumerate(["Audi A4", "BMW M3", "Fiat 500"]):
        for i in range(5):
            write_image(root / name / f"{i}.jpg", seed=10 * c + i)
    return root
