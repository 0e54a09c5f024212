"""Decoded images on disk, keyed by what they were decoded from (numpy only, no TensorFlow).

Decoding thousands of JPEG files costs a CPU minute or more, and a pipeline run reads the same
images at the same size in many steps and processes. Each set of images is decoded once and
kept as one ``.npy`` file under ``CARS_ML_CACHE/images``, which later reads map into memory.
The key covers every record's path, crop box, label order, file size and modification time,
and the decoder's version, so an edited or replaced file is decoded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cars_ml.data.types import ImageRecord, cache_entry_lock, default_cache_dir

log = logging.getLogger(__name__)

# Bump when decoding changes (crop, resize, colour conversion): older files are then ignored.
DECODER_VERSION = 1
# One cached array at most this large: the colour set's 4,000 images at 260 px take 0.8 GB,
# the full Stanford Cars' 16,185 at 224 px 2.4 GB.
LIMIT_BYTES = 3 * 1024**3


def fits(count: int, image_size: int) -> bool:
    return count * image_size * image_size * 3 <= LIMIT_BYTES


def key(records: Sequence[ImageRecord], image_size: int) -> str:
    digest = hashlib.sha256(json.dumps([DECODER_VERSION, image_size]).encode())
    for record in records:
        stat = os.stat(record.path)
        item = [record.path, record.bbox, stat.st_size, stat.st_mtime_ns]
        digest.update(json.dumps(item).encode())
    return digest.hexdigest()[:24]


def cached(
    records: Sequence[ImageRecord],
    image_size: int,
    decode: Callable[[Sequence[ImageRecord], int], np.ndarray],
) -> np.ndarray:
    """``decode(records, image_size)``, from the cache when it holds that result.

    Written under a temporary name and renamed, so a process killed mid-write leaves no file
    that a later run would trust; a cached file that cannot be read is decoded again. Processes
    asking for the same images at once decode them once (:func:`cache_entry_lock`).
    """
    path = default_cache_dir() / "images" / f"{key(records, image_size)}-{image_size}px.npy"
    with cache_entry_lock(path):
        if path.is_file():
            try:
                images = np.load(path, mmap_mode="r")
                if images.shape == (len(records), image_size, image_size, 3):
                    return images
            except (OSError, ValueError) as exc:
                log.warning("Decoding again: cached images %s are unreadable (%s)", path, exc)
        images = decode(records, image_size)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npy")
        np.save(partial, images)
        Path(partial).replace(path)
    return images
