"""A deterministic, learnable synthetic car dataset written in the official devkit layout.

Each class is a combination of body type (outline), paint colour and livery (texture); every
image draws its car at a random position and scale over a random cluttered background, with
colour jitter, noise and JPEG artefacts. The ``.mat`` files have the same struct layout as the
real devkit, so the demo runs the real Stanford Cars reader. Numpy and PIL only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image, ImageDraw

from cars_ml.data.types import default_cache_dir

# Bump when the drawing changes, so cached datasets from older code are not reused.
VERSION = 1
ANNOTATION_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
# A fixed header replaces savemat's timestamp so that two generations are byte-identical.
_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created by cars_ml synthetic generator"

# Body outlines in a unit box (x right, y down, 1 = ground): lower body (y top, y bottom,
# x start, x end), cabin polygon, wheel radius, height/length ratio.
_BODIES = {
    "Coupe": (
        (0.50, 0.85, 0.0, 1.0),
        [(0.28, 0.5), (0.45, 0.2), (0.66, 0.2), (0.86, 0.5)],
        0.11,
        0.42,
    ),
    "Sedan": (
        (0.45, 0.85, 0.0, 1.0),
        [(0.22, 0.45), (0.33, 0.14), (0.68, 0.14), (0.80, 0.45)],
        0.12,
        0.45,
    ),
    "SUV": (
        (0.38, 0.85, 0.0, 1.0),
        [(0.08, 0.38), (0.14, 0.04), (0.86, 0.04), (0.92, 0.38)],
        0.15,
        0.60,
    ),
    "Pickup": (
        (0.45, 0.85, 0.0, 1.0),
        [(0.08, 0.45), (0.14, 0.10), (0.42, 0.10), (0.48, 0.45)],
        0.14,
        0.50,
    ),
    "Van": (
        (0.20, 0.85, 0.0, 1.0),
        [(0.02, 0.20), (0.12, 0.03), (0.98, 0.03), (0.98, 0.20)],
        0.12,
        0.70,
    ),
    "Hatchback": (
        (0.45, 0.85, 0.1, 0.9),
        [(0.20, 0.45), (0.30, 0.10), (0.84, 0.14), (0.90, 0.45)],
        0.12,
        0.55,
    ),
    "Wagon": (
        (0.45, 0.85, 0.0, 1.0),
        [(0.20, 0.45), (0.30, 0.13), (0.96, 0.13), (0.98, 0.45)],
        0.12,
        0.45,
    ),
    "Convertible": (
        (0.55, 0.85, 0.0, 1.0),
        [(0.36, 0.55), (0.44, 0.34), (0.48, 0.34), (0.43, 0.55)],
        0.11,
        0.38,
    ),
}
_TYPES = tuple(_BODIES)
_COLOURS = (
    (200, 30, 30),
    (30, 70, 200),
    (30, 150, 60),
    (230, 200, 40),
    (235, 235, 235),
    (40, 40, 45),
    (240, 120, 20),
    (130, 50, 160),
)
_LIVERIES = ("plain", "band", "stripes", "dots")


@dataclass(frozen=True)
class SyntheticSpec:
    """Generator parameters; they (with ``VERSION``) name the cache folder."""

    num_classes: int = 10
    train_per_class: int = 40
    test_per_class: int = 12
    width: int = 128
    height: int = 96
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= 256:
            raise ValueError(f"num_classes must be 1..256, got {self.num_classes}.")
        if self.train_per_class < 1 or self.test_per_class < 0:
            raise ValueError("train_per_class must be >= 1 and test_per_class >= 0.")
        if self.width < 16 or self.height < 16:
            raise ValueError(f"images must be at least 16x16 px, got {self.width}x{self.height}.")

    def key(self) -> str:
        """Short hash of the parameters and generator version."""
        payload = json.dumps({**asdict(self), "version": VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def class_style(class_id: int) -> tuple[str, tuple[int, int, int], str]:
    """Body type, paint colour and livery of a 0-based class; unique for up to 256 classes."""
    r, q = class_id % 8, (class_id // 8) % 8
    return _TYPES[r], _COLOURS[(3 * r + q) % 8], _LIVERIES[(class_id + class_id // 64) % 4]


def class_names(num_classes: int) -> list[str]:
    """Car-like names: ``Synthetic Coupe 01``, ``Synthetic Sedan 02``, ..."""
    return [f"Synthetic {class_style(i)[0]} {i + 1:02d}" for i in range(num_classes)]


def ensure_synthetic(
    cache_dir: Path | str | None = None, spec: SyntheticSpec | None = None
) -> Path:
    """Root of the synthetic dataset for ``spec``, generating it on first use.

    It is generated into a temporary sibling folder and renamed into place, so an interrupted
    run never leaves a half-written dataset behind.
    """
    spec = spec or SyntheticSpec()
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    target = base / f"synthetic-{spec.key()}"
    if (target / "devkit" / "cars_meta.mat").is_file():
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=base))
    try:
        generate(tmp, spec)
        os.rename(tmp, target)
    except OSError:
        # Another process finished first: its copy is identical, keep it and drop ours.
        if not (target / "devkit" / "cars_meta.mat").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def generate(root: Path, spec: SyntheticSpec) -> None:
    """Write the whole dataset (images and ``.mat`` files) under ``root``."""
    (root / "devkit").mkdir(parents=True, exist_ok=True)
    write_meta_mat(root / "devkit" / "cars_meta.mat", class_names(spec.num_classes))
    for split, per_class in (("train", spec.train_per_class), ("test", spec.test_per_class)):
        if per_class == 0:
            continue
        rows = _write_images(root / f"cars_{split}", spec, split, per_class)
        annos = "cars_train_annos.mat" if split == "train" else "cars_test_annos_withlabels.mat"
        write_annotations_mat(root / "devkit" / annos, rows)
        if split == "test":
            # The real devkit also ships an unlabelled test file; the reader must ignore it.
            write_annotations_mat(root / "devkit" / "cars_test_annos.mat", rows, with_class=False)
    (root / "README.txt").write_text(
        f"Synthetic Stanford-Cars-layout dataset made by cars_ml (generator v{VERSION}).\n"
        f"{json.dumps(asdict(spec))}\n"
    )


def _write_images(folder: Path, spec: SyntheticSpec, split: str, per_class: int) -> list[tuple]:
    folder.mkdir(parents=True, exist_ok=True)
    split_id = 0 if split == "train" else 1
    labels = np.repeat(np.arange(spec.num_classes), per_class)
    # Real devkit files list classes in random order; so does ours.
    np.random.default_rng([spec.seed, split_id, 99]).shuffle(labels)
    rows = []
    for i, label in enumerate(labels):
        rng = np.random.default_rng([spec.seed, split_id, i])
        pixels, box = draw_car(int(label), spec.width, spec.height, rng)
        fname = f"{i + 1:05d}.jpg"
        Image.fromarray(pixels).save(folder / fname, quality=int(rng.integers(80, 96)))
        rows.append((*box, int(label) + 1, fname))
    return rows


def draw_car(
    label: int, width: int, height: int, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One RGB image (uint8, ``height x width x 3``) and the inclusive box around its car."""
    img = _background(width, height, rng)
    draw = ImageDraw.Draw(img)
    body_type, colour, livery = class_style(label)
    (top, bottom, x_start, x_end), cabin, wheel_r, aspect = _BODIES[body_type]
    length = width * rng.uniform(0.5, 0.8)
    tall = length * aspect
    radius = wheel_r * length
    # The car spans from its cabin roof to the bottom of its wheels; keep all of it in frame.
    roof = min(v for _, v in cabin)
    span = (0.85 - roof) * tall + radius
    if span > height * 0.9:
        scale = height * 0.9 / span
        length, tall, radius, span = length * scale, tall * scale, radius * scale, span * scale
    x0 = rng.uniform(0, width - length)
    y0 = rng.uniform(0, height - span) - roof * tall
    flip = rng.random() < 0.5
    paint = tuple(int(c) for c in np.clip(np.array(colour) + rng.normal(0, 12, 3), 0, 255))

    def pt(u: float, v: float) -> tuple[float, float]:
        return (x0 + (1 - u if flip else u) * length, y0 + v * tall)

    body = [pt(x_start, top), pt(x_end, top), pt(x_end, bottom), pt(x_start, bottom)]
    roof_line = [pt(u, v) for u, v in cabin]
    draw.polygon(body, fill=paint)
    draw.polygon(roof_line, fill=paint)
    cx = sum(u for u, _ in cabin) / len(cabin)
    cy = sum(v for _, v in cabin) / len(cabin)
    glass = [pt(cx + 0.75 * (u - cx), cy + 0.7 * (v - cy)) for u, v in cabin]
    draw.polygon(glass, fill=(150, 190, 215))
    _livery(draw, livery, paint, pt, (top, bottom, x_start, x_end))
    lamp = [pt(x_end - 0.05, top + 0.05), pt(x_end, top + 0.05), pt(x_end, top + 0.15)]
    draw.polygon([*lamp, pt(x_end - 0.05, top + 0.15)], fill=(255, 240, 150))
    for u in (0.2, 0.8):
        wx, wy = pt(x_start + u * (x_end - x_start), bottom)
        draw.ellipse([wx - radius, wy - radius, wx + radius, wy + radius], fill=(20, 20, 20))
        hub = radius / 2
        draw.ellipse([wx - hub, wy - hub, wx + hub, wy + hub], fill=(170, 170, 170))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (height, width, 3))
    xs = [x for x, _ in body + roof_line]
    ys = [y for _, y in body + roof_line] + [y0 + bottom * tall + radius]
    box = (
        max(0, int(np.floor(min(xs)))),
        max(0, int(np.floor(min(ys)))),
        min(width - 1, int(np.ceil(max(xs)))),
        min(height - 1, int(np.ceil(max(ys)))),
    )
    return np.clip(arr, 0, 255).astype(np.uint8), box


def _background(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    sky, ground = rng.integers(40, 230, 3), rng.integers(30, 200, 3)
    t = np.linspace(0, 1, height)[:, None, None]
    arr = (sky * (1 - t) + ground * t) * np.ones((1, width, 1))
    img = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(4, width / 3), rng.uniform(4, height / 3)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x, y, x + w, y + h], fill=tuple(int(c) for c in rng.integers(30, 220, 3)))
    return img


def _livery(draw: ImageDraw.ImageDraw, livery: str, paint: tuple, pt, body: tuple) -> None:
    top, bottom, x_start, x_end = body
    luminance = 0.3 * paint[0] + 0.6 * paint[1] + 0.1 * paint[2]
    ink = (20, 20, 20) if luminance > 140 else (245, 245, 245)
    mid = (top + bottom) / 2
    if livery == "band":
        band = [pt(x_start, mid - 0.05), pt(x_end, mid - 0.05), pt(x_end, mid + 0.05)]
        draw.polygon(band + [pt(x_start, mid + 0.05)], fill=ink)
    elif livery == "stripes":
        for u in np.linspace(x_start + 0.1, x_end - 0.1, 5):
            draw.polygon(
                [pt(u, top), pt(u + 0.05, top), pt(u + 0.05, bottom), pt(u, bottom)], fill=ink
            )
    elif livery == "dots":
        for u in np.linspace(x_start + 0.12, x_end - 0.12, 4):
            (a, b), (c, d) = pt(u - 0.04, mid - 0.08), pt(u + 0.04, mid + 0.08)
            draw.ellipse([min(a, c), b, max(a, c), d], fill=ink)


def write_meta_mat(path: Path, names: list[str]) -> None:
    """Write ``cars_meta.mat``: ``class_names`` as a (1, K) cell array of strings."""
    cells = np.empty((1, len(names)), dtype=object)
    for i, name in enumerate(names):
        cells[0, i] = np.array([name])
    _savemat(path, {"class_names": cells})


def write_annotations_mat(path: Path, rows: list[tuple], *, with_class: bool = True) -> None:
    """Write devkit-style ``annotations`` from ``(x1, y1, x2, y2, class_id, fname)`` rows."""
    _savemat(path, {"annotations": _struct(rows, with_class)})


def _struct(rows: list[tuple], with_class: bool) -> np.ndarray:
    """A (1, N) MATLAB struct array laid out like the devkit's ``annotations``."""
    fields = [f for f in ANNOTATION_FIELDS if with_class or f != "class"]
    arr = np.empty((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        values = dict(zip(ANNOTATION_FIELDS, row, strict=True))
        for f in fields:
            v = values[f]
            # The devkit stores each number as a 1x1 uint8, or uint16 when it does not fit.
            arr[0, i][f] = np.array([v]) if f == "fname" else np.array([[v]], dtype=_int_type(v))
    return arr


def _int_type(value: int) -> type:
    return np.uint8 if value < 256 else np.uint16


def _savemat(path: Path, variables: dict) -> None:
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, variables)
    data = bytearray(buffer.getvalue())
    data[:116] = _MAT_HEADER.ljust(116, b" ")
    path.write_bytes(bytes(data))
