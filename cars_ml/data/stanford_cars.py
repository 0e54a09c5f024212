"""Reader for the official Stanford Cars devkit layout (MATLAB ``.mat`` annotations).

Expected tree (also accepted one level down, under ``stanford_cars/``)::

    root/devkit/cars_meta.mat             196 class names
    root/devkit/cars_train_annos.mat      bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname
    root/cars_train/*.jpg
    root/cars_test/*.jpg                  optional, with a labelled annotation file:
    root/[devkit/]cars_test_annos_withlabels.mat
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import scipy.io
from PIL import Image

from cars_ml.data.types import DataError, ImageRecord, LayoutData

log = logging.getLogger(__name__)

LAYOUT = "stanford_cars"
META = "cars_meta.mat"
TRAIN_ANNOS = "cars_train_annos.mat"
TEST_ANNOS = ("cars_test_annos_withlabels.mat", "cars_test_annos.mat")
BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
EXPECTED = (
    "root/devkit/cars_meta.mat, root/devkit/cars_train_annos.mat and root/cars_train/*.jpg "
    "(optionally root/cars_test/ with cars_test_annos_withlabels.mat in root/ or root/devkit/; "
    "the same tree may sit under root/stanford_cars/)"
)
# Real Stanford Cars boxes sometimes poke a few pixels past the image; those are clamped. A box
# that overshoots by more than this share of the image is in some other coordinate system (for
# example a downscaled copy of the images) and cropping to it would cut the wrong region.
BOX_TOLERANCE = 0.1


def find_root(path: Path) -> Path | None:
    """The Stanford Cars root at ``path`` or ``path/stanford_cars``, or ``None`` if neither."""
    for candidate in (path, path / "stanford_cars"):
        if (candidate / "devkit").is_dir() or (candidate / "cars_train").is_dir():
            return candidate
        if (candidate / META).is_file():
            return candidate
    return None


def read_class_names(meta_path: Path) -> list[str]:
    """Class names from ``cars_meta.mat`` (index 0 is class id 1)."""
    mat = _loadmat(meta_path)
    if "class_names" not in mat:
        raise DataError(
            f"{meta_path} has no 'class_names' variable; it is not the devkit's {META}. "
            "Re-download the Stanford Cars devkit."
        )
    return [str(np.asarray(item).ravel()[0]).strip() for item in np.ravel(mat["class_names"])]


def read_annotations(path: Path, *, require_class: bool = False) -> list[dict]:
    """Rows ``{fname, class (1-based or None), box, problem}`` from a devkit annotation file.

    ``problem`` is ``None`` for a good record, else why the record is unusable (an empty or
    unreadable field); the caller decides whether that raises or is skipped. ``require_class``
    raises ``DataError`` when the file has no ``class`` field (the unlabelled test file).
    """
    mat = _loadmat(path)
    annos = mat.get("annotations")
    if annos is None or annos.dtype.names is None:
        raise DataError(
            f"{path} has no 'annotations' struct array; it is not a Stanford Cars annotation "
            "file. Re-download the devkit."
        )
    names = set(annos.dtype.names)
    missing = [f for f in (*BOX_FIELDS, "fname") if f not in names]
    if missing:
        raise DataError(f"{path} lacks the fields {missing}; re-download the Stanford Cars devkit.")
    labelled = "class" in names
    if require_class and not labelled:
        raise DataError(
            f"{path} has no 'class' field, so its images carry no labels (it looks like the "
            "unlabelled cars_test_annos.mat). Use the labelled annotation file from the devkit."
        )
    return [_read_record(rec, labelled) for rec in np.ravel(annos)]


def _read_record(rec, labelled: bool) -> dict:
    row = {"fname": None, "class": None, "box": None, "problem": None}
    fields = ("fname", *(("class",) if labelled else ()), *BOX_FIELDS)
    values = {}
    for field in fields:
        cell = np.asarray(rec[field]).ravel()
        if cell.size == 0:
            row["problem"] = f"has an empty '{field}' field"
            return row
        values[field] = cell[0]
    row["fname"] = str(values["fname"]).strip()
    if not row["fname"]:
        row["problem"] = "has an empty 'fname' field"
        return row
    try:
        row["class"] = int(values["class"]) if labelled else None
        row["box"] = tuple(int(values[f]) for f in BOX_FIELDS)
    # A field holding text or a nested struct where a number belongs.
    except (TypeError, ValueError) as exc:
        row["problem"] = f"({row['fname']}) has a field that is not a number ({exc})"
    return row


def _escapes(fname: str) -> bool:
    """Whether ``fname`` is absolute or climbs out of its folder with ``..``.

    A lexical check, so a dataset whose images are symbolic links into shared storage still
    works: only the annotation file, which may come from anywhere, is distrusted.
    """
    posix = PurePosixPath(fname.replace("\\", "/"))
    return posix.is_absolute() or ".." in posix.parts or bool(PureWindowsPath(fname).drive)


def clamp_bbox(
    box: tuple[int, int, int, int], width: int, height: int
) -> tuple[int, int, int, int] | None:
    """Clamp an inclusive ``(x1, y1, x2, y2)`` box to the image, or ``None`` if it does not fit."""
    x1, y1, x2, y2 = box
    slack_x, slack_y = BOX_TOLERANCE * width, BOX_TOLERANCE * height
    if x2 > width - 1 + slack_x or y2 > height - 1 + slack_y or x1 < -slack_x or y1 < -slack_y:
        return None
    x1, y1 = max(0, x1), max(0, y1)
    x2, y2 = min(width - 1, x2), min(height - 1, y2)
    if x1 >= x2 or y1 >= y2:
        return None
    return (x1, y1, x2, y2)


def load_stanford_cars(
    root: Path, *, crop_to_bbox: bool = True, skip_bad_images: bool = False
) -> LayoutData:
    """Read class names, training and (if labelled) test annotations under ``root``.

    Class ids in the files are 1-based; records carry 0-based labels. Raises ``DataError`` for
    a missing devkit file, a class id out of range, or (unless ``skip_bad_images``) an annotated
    image that is missing on disk.
    """
    devkit = root / "devkit"
    for required in (devkit / META, devkit / TRAIN_ANNOS):
        if not required.is_file():
            raise DataError(
                f"Missing devkit file {required}. A Stanford Cars root needs {EXPECTED}. "
                "Download the devkit (car_devkit.tgz) and extract it into the root."
            )
    if not (root / "cars_train").is_dir():
        raise DataError(f"Missing image folder {root / 'cars_train'}. Expected {EXPECTED}.")
    class_names = read_class_names(devkit / META)
    data = LayoutData(LAYOUT, str(root), class_names, [], None, "held_out")
    data.train = _records(
        devkit / TRAIN_ANNOS, root / "cars_train", class_names, data, crop_to_bbox, skip_bad_images
    )
    test_annos = _find_test_annotations(root)
    if test_annos is not None:
        if not (root / "cars_test").is_dir():
            raise DataError(
                f"{test_annos} is present but the test images folder {root / 'cars_test'} is "
                "missing. Extract cars_test.tgz into the root, or remove the annotation file to "
                "hold out a test split from the training images instead."
            )
        data.test = _records(
            test_annos, root / "cars_test", class_names, data, crop_to_bbox, skip_bad_images
        )
        data.test_source = "official"
    return data


def _find_test_annotations(root: Path) -> Path | None:
    """The labelled test annotation file, if any; unlabelled ones are reported and ignored."""
    for name in TEST_ANNOS:
        for folder in (root, root / "devkit"):
            path = folder / name
            if not path.is_file():
                continue
            annos = _loadmat(path).get("annotations")
            if annos is not None and "class" in (annos.dtype.names or ()):
                return path
            log.info("Ignoring %s: it has no class labels, so it cannot be a test set.", path)
    return None


def _records(
    annos_path: Path,
    image_dir: Path,
    class_names: list[str],
    data: LayoutData,
    crop_to_bbox: bool,
    skip_bad_images: bool,
) -> list[ImageRecord]:
    records, missing, bad = [], [], []
    for i, row in enumerate(read_annotations(annos_path, require_class=True)):
        problem = row["problem"]
        if problem is None and _escapes(row["fname"]):
            problem = (
                f"has fname {row['fname']!r}, which points outside the image folder "
                f"{image_dir} (an absolute path or one that climbs out with '..'); it is not read"
            )
        if problem is not None:
            if not skip_bad_images:
                raise DataError(
                    f"{annos_path}: record {i + 1} {problem}. Fix the annotation file "
                    f"(re-download the devkit), or pass skip_bad_images=true to skip such "
                    "records (they are counted and listed)."
                )
            bad.append(f"{annos_path}: record {i + 1} {problem}")
            continue
        class_id = row["class"]
        if not 1 <= class_id <= len(class_names):
            raise DataError(
                f"{annos_path}: record {i + 1} ({row['fname']}) has class id {class_id}, outside "
                f"the valid range 1..{len(class_names)} of {META}. The annotation file and "
                f"{META} do not belong together; re-download the devkit."
            )
        path = image_dir / row["fname"]
        if not path.is_file():
            missing.append(str(path))
            continue
        bbox = None
        size = _header_size(path) if crop_to_bbox else None
        if size is not None:
            bbox = clamp_bbox(row["box"], *size)
            if bbox is None:
                data.bbox_fallback_paths.add(str(path))
        records.append(ImageRecord(str(path), class_id - 1, bbox))
    if missing and not skip_bad_images:
        raise DataError(
            f"{len(missing)} image(s) annotated in {annos_path} are missing on disk, first: "
            f"{missing[0]}. Restore them (re-extract the image archive into {image_dir}) or "
            "pass skip_bad_images=true to skip them."
        )
    data.skipped.extend(bad)
    data.skipped.extend(f"{p}: annotated in {annos_path.name} but missing on disk" for p in missing)
    return records


def _header_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` from the file header (no pixel decoding), or ``None`` if unreadable."""
    try:
        with warnings.catch_warnings():
            # Between PIL's limit and twice it PIL only warns; validation decides on the file.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return img.size
    # Unreadable files and decompression bombs (over twice PIL's pixel limit, refused while
    # the header is read) are reported by image validation, which names the file and the fix.
    except (OSError, Image.DecompressionBombError):
        return None


def _loadmat(path: Path) -> dict:
    try:
        return scipy.io.loadmat(str(path))
    # scipy reports damaged files with many exception types (IndexError for a short file,
    # NotImplementedError for a MATLAB v7.3 HDF5 file).
    except (
        ValueError,
        OSError,
        TypeError,
        IndexError,
        KeyError,
        EOFError,
        NotImplementedError,
    ) as exc:
        raise DataError(
            f"Cannot read {path} as a MATLAB file ({exc}). Re-download the Stanford Cars devkit."
        ) from exc
