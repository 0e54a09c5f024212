"""Human-readable summaries of a split dataset: a per-class count table and a sample grid."""

from __future__ import annotations

import math
import textwrap
from collections import Counter

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from cars_ml.data.types import DatasetSplits, ImageRecord


def class_count_table(splits: DatasetSplits) -> pd.DataFrame:
    """One row per class: ``class_id, class_name, train, val, test, total``."""
    counts = {
        part: Counter(r.label for r in getattr(splits, part)) for part in ("train", "val", "test")
    }
    frame = pd.DataFrame(
        {
            "class_id": range(splits.num_classes),
            "class_name": list(splits.class_names),
            **{part: [counts[part][c] for c in range(splits.num_classes)] for part in counts},
        }
    )
    frame["total"] = frame["train"] + frame["val"] + frame["test"]
    return frame


def _sample(records: tuple[ImageRecord, ...], n: int) -> list[ImageRecord]:
    """Up to ``n`` records, one per class first (lowest class ids), then more of each."""
    by_class: dict[int, list[ImageRecord]] = {}
    for record in records:
        by_class.setdefault(record.label, []).append(record)
    picked: list[ImageRecord] = []
    depth = 0
    while len(picked) < n and any(len(group) > depth for group in by_class.values()):
        for label in sorted(by_class):
            if len(by_class[label]) > depth and len(picked) < n:
                picked.append(by_class[label][depth])
        depth += 1
    return picked


def sample_grid_figure(splits: DatasetSplits, n: int = 16) -> Figure:
    """A grid of up to ``n`` training images (cropped like the pipeline) titled by class name."""
    records = _sample(splits.train, n)
    cols = max(1, math.ceil(math.sqrt(len(records))))
    rows = max(1, math.ceil(len(records) / cols))
    # A bare Figure on the Agg canvas: no pyplot state and no GUI backend, safe in servers.
    fig = Figure(figsize=(2.2 * cols, 2.4 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for i, record in enumerate(records):
        ax = fig.add_subplot(rows, cols, i + 1)
        with Image.open(record.path) as img:
            img = img.convert("RGB")
            if record.bbox is not None:
                x1, y1, x2, y2 = record.bbox
                img = img.crop((x1, y1, x2 + 1, y2 + 1))
            img.thumbnail((160, 160))
            ax.imshow(img)
        title = "\n".join(textwrap.wrap(splits.class_names[record.label], 22)[:2])
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.suptitle(f"{splits.name}: {len(records)} training samples", fontsize=9)
    fig.tight_layout()
    return fig
