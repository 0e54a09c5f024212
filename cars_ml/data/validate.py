"""Check that every image decodes, before any training sees it.

A full decode catches truncated and corrupt files that a header check misses. JPEGs are decoded
at reduced scale (``Image.draft``), which still reads every compressed byte but skips most of
the pixel work; on the 4,000 real low-resolution training images this takes about 0.2 s, so the
results are not cached.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from PIL import Image

from cars_ml.data.types import DataError, ImageRecord

# Formats tf.io.decode_image understands; PIL reads more (WebP, TIFF) that the pipeline would
# then fail on in the middle of training.
TF_FORMATS = frozenset({"JPEG", "PNG", "GIF", "BMP"})


def image_problem(path: str) -> str | None:
    """Why ``path`` cannot be used as a training image, or ``None`` when it decodes fine."""
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is not a broken file; PIL raises for real bombs.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.format not in TF_FORMATS:
                    return f"unsupported format {img.format} (use JPEG or PNG)"
                if img.format == "JPEG":
                    img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
                if img.width < 1 or img.height < 1:
                    return "empty image"
    except FileNotFoundError:
        return "file not found"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        # PIL reports corrupt data as OSError ("image file is truncated", "cannot identify
        # image file") and, for some malformed headers, SyntaxError or ValueError.
        return f"cannot decode ({type(exc).__name__}: {exc})"
    return None


def validate_records(
    records: Sequence[ImageRecord], *, skip_bad_images: bool
) -> tuple[list[ImageRecord], list[str]]:
    """Records whose image decodes, plus ``"path: reason"`` lines for those that do not.

    Without ``skip_bad_images`` the first bad image raises ``DataError`` naming it and the fix.
    """
    good, skipped = [], []
    for record in records:
        problem = image_problem(record.path)
        if problem is None:
            good.append(record)
            continue
        if not skip_bad_images:
            raise DataError(
                f"Bad image {record.path}: {problem}. Fix or remove the file, or pass "
                "skip_bad_images=true to skip bad images (they are counted and listed)."
            )
        skipped.append(f"{record.path}: {problem}")
    return good, skipped
