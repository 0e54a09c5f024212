"""Hostile or damaged dataset files: a clear DataError naming the file, or skipped and counted.

Decompression bombs caught while reading headers, annotation files without a ``class`` field or
with empty fields, and ``fname`` values that are absolute or climb out of the dataset root (the
loader must never read outside the root).
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from data_helpers import write_image
from PIL import Image

from cars_ml.data import DataConfig, DataError, DataWarning, load_dataset
from cars_ml.data.synthetic import _savemat, _struct, write_annotations_mat

FIX = "skip_bad_images=true"
ROWS = [(1, 1, 20, 20, 1 + i % 3, f"{i + 1:05d}.jpg") for i in range(18)]


def _load(root, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return load_dataset(DataConfig(data=str(root), **kwargs))


def _png_header(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` with one empty data chunk: a few
    bytes that PIL refuses as a decompression bomb as soon as it reads the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _annotations(root: Path) -> Path:
    return root / "devkit" / "cars_train_annos.mat"


def test_decompression_bomb_in_header_is_named(small_cars):
    bomb = small_cars / "cars_train" / "00004.jpg"
    bomb.write_bytes(_png_header(60_000, 60_000))
    with pytest.raises(DataError) as err:
        _load(small_cars)
    message = str(err.value)
    assert str(bomb) in message and FIX in message
    assert "DecompressionBomb" in message or "pixels" in message


def test_decompression_bomb_is_skipped_and_counted(small_cars):
    (small_cars / "cars_train" / "00004.jpg").write_bytes(_png_header(60_000, 60_000))
    splits = _load(small_cars, skip_bad_images=True)
    assert splits.num_skipped == 1 and splits.summary()["num_images"] == 27 - 1
    assert splits.skipped[0].startswith(str(small_cars / "cars_train" / "00004.jpg"))


def test_annotations_without_class_field(small_cars):
    write_annotations_mat(_annotations(small_cars), ROWS, with_class=False)
    with pytest.raises(DataError) as err:
        _load(small_cars)
    message = str(err.value)
    assert str(_annotations(small_cars)) in message and "'class'" in message


@pytest.mark.parametrize("field", ["class", "fname", "bbox_x2"])
def test_empty_field_is_named(small_cars, field):
    arr = _struct(ROWS, True)
    arr[0, 4][field] = np.zeros((0, 0), dtype=np.uint8)
    _savemat(_annotations(small_cars), {"annotations": arr})
    with pytest.raises(DataError) as err:
        _load(small_cars)
    message = str(err.value)
    assert str(_annotations(small_cars)) in message
    assert "record 5" in message and f"empty '{field}'" in message and FIX in message


def test_empty_field_is_skipped_and_counted(small_cars):
    arr = _struct(ROWS, True)
    arr[0, 4]["fname"] = np.array([""])
    _savemat(_annotations(small_cars), {"annotations": arr})
    splits = _load(small_cars, skip_bad_images=True)
    assert splits.num_skipped == 1 and splits.summary()["num_images"] == 27 - 1
    assert "record 5" in splits.skipped[0]


@pytest.fixture()
def outside(tmp_path) -> Path:
    """A readable image outside the dataset root, which no fname may reach."""
    return write_image(tmp_path / "secret" / "outside.jpg")


@pytest.fixture()
def opened(monkeypatch) -> list[str]:
    """Every path the data layer opens with PIL."""
    paths: list[str] = []
    real_open = Image.open

    def spy(fp, *args, **kwargs):
        paths.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spy)
    return paths


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_fname_outside_the_root_is_refused_unread(small_cars, outside, opened, kind):
    fname = "../../secret/outside.jpg" if kind == "relative" else str(outside)
    assert (small_cars / "cars_train" / fname).resolve() == outside.resolve()
    rows = list(ROWS)
    rows[4] = (1, 1, 20, 20, 2, fname)
    write_annotations_mat(_annotations(small_cars), rows)
    with pytest.raises(DataError) as err:
        _load(small_cars)
    message = str(err.value)
    assert str(_annotations(small_cars)) in message and "record 5" in message
    assert fname in message and "outside" in message and FIX in message
    assert not [p for p in opened if "secret" in p]


def test_fname_outside_the_root_is_skipped_unread(small_cars, outside, opened):
    rows = list(ROWS)
    rows[4] = (1, 1, 20, 20, 2, "../../secret/outside.jpg")
    write_annotations_mat(_annotations(small_cars), rows)
    splits = _load(small_cars, skip_bad_images=True)
    assert splits.num_skipped == 1 and splits.summary()["num_images"] == 27 - 1
    assert "outside" in splits.skipped[0]
    kept = {r.path for r in (*splits.train, *splits.val, *splits.test)}
    assert not [p for p in kept if "secret" in p]
    assert not [p for p in opened if "secret" in p]
